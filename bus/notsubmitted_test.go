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

// Every failure before the publish that is no refusal of the job itself is
// ErrNotSubmitted: a RESULTS lookup that failed (here RESULTS is gone, as in
// a restart before provisioning) and a closed connection left nothing
// stored, and said neither (red team round 23: 10 submits of the operator's
// campaign, "check results: no stream", "not connected"). A refusal keeps
// its own error. Mutation caught: notSubmitted wrapping only context and
// connection errors, or Submit returning prepare's error as is: red.
func TestSubmitFailingBeforeThePublishSaysNotSubmitted(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	p, err := NewClient(b.nc, WithoutModelCheck())
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	if _, err := p.Submit(ctx, &schemas.JobRequest{Model: "tiny"}); !errors.Is(err, schemas.ErrInvalid) || errors.Is(err, ErrNotSubmitted) {
		t.Fatalf("an invalid job: %v, want its ValidationError alone", err)
	}
	if err := b.js.DeleteStream(ctx, subjects.StreamResults); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Submit(ctx, &schemas.JobRequest{ID: "given-1", Model: "tiny", Prompt: "x"}); !errors.Is(err, ErrNotSubmitted) {
		t.Fatalf("Submit whose RESULTS check failed: %v, want ErrNotSubmitted", err)
	}
	if n := streamMsgs(t, b.js, subjects.StreamJobs); n != 0 {
		t.Fatalf("JOBS has %d messages, want none", n)
	}
	b.nc.Close()
	if _, err := p.Submit(ctx, &schemas.JobRequest{ID: "given-2", Model: "tiny", Prompt: "x"}); !errors.Is(err, ErrNotSubmitted) || !errors.Is(err, ErrNotConnected) {
		t.Fatalf("Submit on a closed connection: %v, want ErrNotSubmitted wrapping ErrNotConnected", err)
	}
}
