package bus

import (
	"errors"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// TestSubmitDuplicateIDAtAnotherPriority: a job id still queued is refused at
// every priority, not only at its own. The priority is a token of the job
// subject, so the one-message-per-subject limit alone took the same id once
// per priority, and two dispatchers ran both as attempt 1. Submit and
// SubmitBatch both, and another tenant's job of the same id is still a job of
// its own.
// Mutation caught: prepare without the Nats-Expected-Last-Subject-Sequence
// headers (both submits succeed, JOBS holds two messages of one id).
func TestSubmitDuplicateIDAtAnotherPriority(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	p := b.client(t, "acme")
	ctx := ctxT(t)

	first := newJob("prio-dup", "first")
	first.Priority = schemas.PriorityLow
	if _, err := p.Submit(ctx, first); err != nil {
		t.Fatal(err)
	}
	second := newJob("prio-dup", "second")
	second.Priority = schemas.PriorityHigh
	if _, err := p.Submit(ctx, second); !errors.Is(err, ErrDuplicate) {
		t.Fatalf("same id at another priority: err = %v, want ErrDuplicate", err)
	}
	third := newJob("prio-dup", "third")
	third.Priority = schemas.PriorityNormal
	_, errs := p.SubmitBatch(ctx, []*schemas.JobRequest{third, newJob("other", "fine")})
	if !errors.Is(errs[0], ErrDuplicate) || errs[1] != nil {
		t.Fatalf("batch: errs %v, want ErrDuplicate then nil", errs)
	}

	other, err := NewClient(b.nc, WithTenant("globex"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.Submit(ctx, newJob("prio-dup", "another tenant's")); err != nil {
		t.Fatalf("same id in another tenant: %v", err)
	}

	var ofID []string
	for _, m := range jobsInStream(t, b.js) {
		if j := decodeJob(t, m.Data); j.ID == "prio-dup" {
			ofID = append(ofID, m.Subject)
		}
	}
	want := []string{subjects.Job("acme", schemas.PriorityLow, "prio-dup"), subjects.Job("globex", schemas.PriorityNormal, "prio-dup")}
	if len(ofID) != 2 || ofID[0] != want[0] || ofID[1] != want[1] {
		t.Fatalf("JOBS holds %v for id prio-dup, want %v", ofID, want)
	}
}
