package bus

import (
	"context"
	"errors"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A submit whose context ended before the publish says so (ErrNotSubmitted),
// with SubmitStream too, and nothing is queued: a caller that took a plain
// context error for "maybe stored" cancelled a job that never came, and that
// cancel was kept a day (the gateway, for 18% of requests whose clients left
// at once: red team round 19, second pass).
// Mutation caught: Submit without its ctx check before the publish.
func TestSubmitEndedBeforeThePublishSaysNotSubmitted(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	p, err := NewClient(b.nc, WithoutModelCheck())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = p.Submit(ctx, &schemas.JobRequest{ID: NewJobID(), Model: "tiny", Prompt: "x"})
	if !errors.Is(err, ErrNotSubmitted) || !errors.Is(err, context.Canceled) {
		t.Fatalf("Submit on an ended context: %v, want ErrNotSubmitted wrapping context.Canceled", err)
	}
	if _, _, err := SubmitStream(ctx, p, b.nc, &schemas.JobRequest{Model: "tiny", Prompt: "x"}, StreamOptions{}); !errors.Is(err, ErrNotSubmitted) {
		t.Fatalf("SubmitStream on an ended context: %v, want ErrNotSubmitted", err)
	}
	if n := streamMsgs(t, b.js, subjects.StreamJobs); n != 0 {
		t.Fatalf("JOBS has %d messages, want none", n)
	}
}
