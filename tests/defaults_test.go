package tests

import (
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A Go client that names only a model and a prompt gets the documented
// defaults: a generated id, priority normal, the default tenant's reply subject,
// a creation time, and — with no max_tokens — generation up to the
// model's context's end (capped at schemas.DefaultMaxTokens) instead of an empty answer.
// Mutation caught: worker/job.go runJob treating MaxTokens 0 of a fresh job as
// "every token produced" (the job completes with no text and 0 tokens).
func TestGoClientDefaults(t *testing.T) {
	s := newStack(t)
	s.startDispatcher("d1")
	s.startWorker(2)
	ctx := testenv.Context(t, 2*time.Minute)

	// EOS (token 2 of the tiny model) banned: with no max_tokens the job must run
	// to the end of the model's 2048-token context (under the 4096 cap).
	job := &schemas.JobRequest{Model: "tiny", Prompt: "Once upon a time", Sampling: schemas.Sampling{LogitBias: map[string]float64{"2": -100}}}
	o, err := s.submit(ctx, job, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(job.ID) != 26 || job.Priority != schemas.PriorityNormal || job.ReplyTo != bus.ReplySubject("", job.ID) || job.CreatedAt == nil {
		t.Fatalf("defaults not filled: %+v", job)
	}
	r := o.result
	if r.Status != schemas.StatusCompleted || r.Text == "" || r.Usage.CompletionTokens == 0 {
		t.Fatalf("a job without max_tokens: %+v", r)
	}
	if r.FinishReason != schemas.FinishLength || r.Usage.TotalTokens != 2048 {
		t.Fatalf("finished %q with %+v, want length at the context's end (2048 tokens)", r.FinishReason, r.Usage)
	}
}
