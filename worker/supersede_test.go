package worker

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// A newer attempt of a job whose older attempt is still here — finished, but
// still trying to hand its record to a dispatcher that died — runs. Taking it
// for a duplicate of the old one (same job, "already running") left the job
// with no run at all, unacked until the worker went away: the short fault
// campaign lost a job that way.
// Mutation caught: in handleAssign, skipping every job already in the table
// whatever its attempt (the old `isRunning` check).
func TestNewerAttemptSupersedesOneStillEnding(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	cfg := fakeConfig(t, b, "w-supersede", time.Millisecond)
	handingOver := make(chan struct{}, 1)
	a := startAgentWith(t, cfg, true, func(a *Agent) {
		a.handOver = func(ctx context.Context, subject string, data []byte) ([]byte, error) {
			if strings.HasSuffix(subject, ".done.gone") {
				// The dispatcher that placed attempt 1 died: the hand-over
				// hangs until its retries give up.
				select {
				case handingOver <- struct{}{}:
				default:
				}
				<-ctx.Done()
				return nil, ctx.Err()
			}
			return a.handOverRequest(ctx, subject, data)
		}
	})
	ctx := within(t, 60*time.Second)

	j := newJob("ending", 3)
	c := collect(t, b.nc, j.ReplyTo)
	first := batch("tiny", j)
	first.DispatcherID = "gone"
	if rep := assign(t, b.nc, a.ID(), first); rep.Status != schemas.AssignAccepted {
		t.Fatalf("attempt 1: %+v", rep)
	}
	select {
	case <-handingOver:
	case <-ctx.Done():
		t.Fatal("attempt 1 never tried to hand its record over")
	}
	second := batch("tiny", j)
	second.Jobs[0].Attempt = 2
	if rep := assign(t, b.nc, a.ID(), second); rep.Status != schemas.AssignAccepted {
		t.Fatalf("attempt 2: %+v", rep)
	}
	r := c.untilResult(ctx)
	if r.Attempt != 2 || r.Status != schemas.StatusCompleted {
		t.Fatalf("result %+v, want attempt 2 completed", r)
	}
}
