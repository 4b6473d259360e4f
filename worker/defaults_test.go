package worker

import (
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// A job that names no max_tokens generates up to the runtime's default (256),
// not nothing: 0 means "omitted". The tiny model keeps EOS unlikely, so it runs
// to the default.
// Mutation caught: dropping `r.aj.Resume != nil &&` in runJob's "every token
// produced" case (the job then ends at once with no text and 0 tokens).
func TestJobWithoutMaxTokensGetsTheDefault(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, realConfig(t, b, "w-defaults"), true)
	ctx := within(t, 120*time.Second)
	j := newJob("Tell me something", 0)
	c := collect(t, b.nc, j.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", j)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	r := c.untilResult(ctx)
	if r.Status != schemas.StatusCompleted || r.Usage.CompletionTokens == 0 || r.Text == "" {
		t.Fatalf("result %+v", r)
	}
	// Until EOS or the end of the tiny model's 2048-token context (the cap,
	// schemas.DefaultMaxTokens, is larger).
	if r.FinishReason == schemas.FinishLength && r.Usage.TotalTokens != min(2048, r.Usage.PromptTokens+schemas.DefaultMaxTokens) {
		t.Fatalf("stopped for length at %+v, want the end of the context", r.Usage)
	}
}
