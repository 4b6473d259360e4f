package worker

import (
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// A retry whose resume no longer fits the model's context (the text the
// caller has retokenizes longer than the tokens that made it) completes with
// that text and finish_reason length: the generation has reached the context.
// Failing it context_exceeded (final, and read as the client's fault) ended
// 17 of 24 long jobs of the red team's eighth round after an attempt timeout.
// A fresh job whose prompt alone is too long still fails context_exceeded.
// Mutation caught: dropping the resumed-context branch in runJob (the
// resumed job fails context_exceeded).
func TestE2EResumePastTheContextCompletesWithLength(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, realConfig(t, b, "w-resume-ctx"), true)
	ctx := within(t, 60*time.Second)

	sent := strings.Repeat("stone river valley ", 1200) // far past the tiny model's 2,048 tokens
	j := newJob("Tell me about the valley", 4000)
	m := batch("tiny", j)
	m.Jobs[0].Attempt = 2
	m.Jobs[0].Resume = &schemas.Resume{Text: sent, CompletionTokens: 1500}
	c := collect(t, b.nc, j.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), m); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	r := c.untilResult(ctx)
	if r.Status != schemas.StatusCompleted || r.FinishReason != schemas.FinishLength || r.Attempt != 2 {
		t.Fatalf("resumed job %s finish %q attempt %d (%+v), want completed length at attempt 2", r.Status, r.FinishReason, r.Attempt, r.Error)
	}
	if r.Text != sent || r.Usage.CompletionTokens != 1500 {
		t.Fatalf("record text %d bytes, %d tokens; want the %d bytes the caller had, 1500 tokens", len(r.Text), r.Usage.CompletionTokens, len(sent))
	}

	fresh := newJob(sent, 16) // the prompt alone does not fit
	c2 := collect(t, b.nc, fresh.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", fresh)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	if r := c2.untilResult(ctx); r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != schemas.CodeContextExceeded {
		t.Fatalf("fresh job with an over-long prompt: %s %+v, want failed %s", r.Status, r.Error, schemas.CodeContextExceeded)
	}
}
