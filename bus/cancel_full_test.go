package bus

import (
	"errors"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
)

// TestCancelOnFullCancels: CANCELS at its bound refuses a new cancel
// (discard-new, red-team F2), and the producer is told so with a stable
// sentinel, not a bare server error; a repeated cancel of a job it holds
// still replaces the stored one.
// Mutation caught: jserr.Map without its IsFull case (the error matches no
// sentinel).
func TestCancelOnFullCancels(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{CancelsMaxMsgs: 2})
	p := b.client(t, "acme")
	ctx := ctxT(t)
	for _, id := range []string{"j1", "j2"} {
		if err := p.Cancel(ctx, id, ""); err != nil {
			t.Fatalf("Cancel %s: %v", id, err)
		}
	}
	if err := p.Cancel(ctx, "j3", ""); !errors.Is(err, ErrStreamFull) {
		t.Fatalf("Cancel on a full CANCELS: %v, want ErrStreamFull", err)
	}
	if err := p.Cancel(ctx, "j1", "again"); err != nil {
		t.Fatalf("repeated Cancel on a full CANCELS: %v", err)
	}
}
