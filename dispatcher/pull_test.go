package dispatcher

import (
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// TestPullSkipsDrainedPrioritiesUntilAnnouncedOrPolled: a priority a fetch
// found empty is not asked again on the next rounds (a closed loop's wake-ups
// asked all three each time) until a wake-up announces a job of it, or until
// pollEvery has passed, which is how a redelivery (it announces nothing) is
// still found. The announcements are set by hand here: the dispatcher is not
// running, so it receives none.
func TestPullSkipsDrainedPrioritiesUntilAnnouncedOrPolled(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	d, ctx := attachedOnly(t, e)
	d.pollEvery = time.Hour
	defer d.checks.Wait()
	high := priorityIndex(schemas.PriorityHigh)
	if got := d.pullOnce(ctx, 4); got != 0 {
		t.Fatalf("pulled %d from empty consumers", got)
	}
	pending := func() {
		t.Helper()
		waitFor(t, 10*time.Second, "the consumer sees the job", func() bool {
			info, err := d.consumers[high].Info(ctx)
			return err == nil && info.NumPending == 1
		})
	}
	e.mustSubmit(newJob("h1", "m", "high"))
	pending()
	if got := d.pullOnce(ctx, 4); got != 0 {
		t.Fatalf("pulled %d from a drained priority without an announcement", got)
	}
	d.storedSeq[high].Store(1) // h1's wake-up
	if got := d.pullOnce(ctx, 4); got != 1 {
		t.Fatalf("pulled %d, want the announced h1", got)
	}
	e.mustSubmit(newJob("h2", "m", "high")) // unannounced, as a redelivery
	pending()
	if got := d.pullOnce(ctx, 4); got != 0 {
		t.Fatalf("pulled %d from a drained priority without an announcement", got)
	}
	d.undrainedAt = time.Now().Add(-d.pollEvery) // the poll is due
	if got := d.pullOnce(ctx, 4); got != 1 {
		t.Fatalf("pulled %d once the poll was due, want h2", got)
	}
}
