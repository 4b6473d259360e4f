package bus

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// TestSubmitBatch: a batch queues its valid jobs in order, and each refused
// job gets Submit's error while the rest are queued: one breaking the schema
// (nothing published), one already queued, one already finished.
func TestSubmitBatch(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	p, err := NewClient(b.nc, WithTenant("acme"), WithDefaultModel("tiny"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	if _, err := p.Submit(ctx, newJob("queued", "first")); err != nil {
		t.Fatal(err)
	}
	done := newResult("finished", 1, "w1", "hi")
	done.Tenant = "acme"
	if err := results.Record(ctx, b.js, done); err != nil {
		t.Fatal(err)
	}
	invalid := newJob("invalid", "")
	invalid.Prompt = "" // neither prompt nor messages
	jobs := []*schemas.JobRequest{newJob("a", "1"), invalid, newJob("queued", "again"), newJob("b", "2"), newJob("finished", "again"), newJob("c", "3"), {Prompt: "no id"}}
	acks, errs := p.SubmitBatch(ctx, jobs)

	var verr *schemas.ValidationError
	if !errors.As(errs[1], &verr) || !errors.Is(errs[2], ErrDuplicate) || !errors.Is(errs[4], ErrDuplicate) {
		t.Fatalf("errors %v", errs)
	}
	var seqs []uint64
	for _, i := range []int{0, 3, 5, 6} {
		if errs[i] != nil || acks[i].JobID != jobs[i].ID || acks[i].Stream != subjects.StreamJobs ||
			acks[i].Subject != subjects.Job("acme", schemas.PriorityNormal, jobs[i].ID) {
			t.Fatalf("job %d: ack %+v, err %v", i, acks[i], errs[i])
		}
		seqs = append(seqs, acks[i].Sequence)
	}
	if len(jobs[6].ID) != 26 {
		t.Fatalf("no id generated: %q", jobs[6].ID)
	}
	if !slices.IsSorted(seqs) || seqs[0] != 2 || seqs[3] != 5 {
		t.Fatalf("sequences %v, want 2..5 in submit order", seqs)
	}
	msgs := jobsInStream(t, b.js)
	if len(msgs) != 5 || decodeJob(t, msgs[0].Data).Prompt != "first" {
		t.Fatalf("JOBS holds %d messages, want the first submit and the batch's 4", len(msgs))
	}
}

// A batch whose context ended before its publishes sends nothing and says so
// for each job (ErrNotSubmitted), as Submit does: before, it published every
// job of a cancelled context and answered each "context canceled", so the
// caller took jobs that ran for ones that might not (red team round 22).
// Mutation caught: SubmitBatch without its ctx.Err check before publishing:
// the jobs stored, no ErrNotSubmitted: red.
func TestSubmitBatchAfterItsContextEndedSendsNothing(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	p, err := NewClient(b.nc, WithTenant("acme"), WithDefaultModel("tiny"), WithoutModelCheck())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(ctxT(t))
	cancel()
	jobs := []*schemas.JobRequest{{Prompt: "one"}, {Prompt: "two"}, {Prompt: "three"}}
	_, errs := p.SubmitBatch(ctx, jobs)
	for i, err := range errs {
		if !errors.Is(err, ErrNotSubmitted) || !errors.Is(err, context.Canceled) {
			t.Errorf("job %d: %v, want ErrNotSubmitted wrapping context.Canceled", i, err)
		}
	}
	if n := len(jobsInStream(t, b.js)); n != 0 {
		t.Fatalf("%d jobs stored from a batch whose context had ended", n)
	}
}
