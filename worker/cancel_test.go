package worker

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A cancel that names another attempt than the one running does not stop it:
// a dispatcher that gave up on attempt 1 (attempt_timeout) tells the worker to
// stop attempt 1, and that cancel may arrive after attempt 2 of the same job
// was placed on the same worker. The job here runs at attempt 1 and is sent a
// cancel for attempt 2 right after its first token: it completes.
// Mutation caught: dropping the attempt check in handleCancel (the job ends
// cancelled).
func TestE2ECancelOfAnotherAttemptIsIgnored(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, realConfig(t, b, "w-cancel-attempt"), true)
	ctx := within(t, 60*time.Second)

	j := newJob("Keep going", 300)
	c := collect(t, b.nc, j.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", j)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	if tok, _ := c.next(ctx); tok == nil {
		t.Fatal("no token before the result")
	}
	cm, _ := json.Marshal(schemas.CancelMsg{JobID: j.ID, Tenant: j.Tenant, Attempt: 2, Reason: "attempt timed out", RequestedAt: time.Now().UTC()})
	if err := b.nc.PublishRequest(subjects.WorkerCancel(a.ID()), b.nc.NewInbox(), cm); err != nil {
		t.Fatal(err)
	}
	r := c.untilResult(ctx)
	if r.Status != schemas.StatusCompleted || r.Attempt != 1 {
		t.Fatalf("result %s at attempt %d, want completed at attempt 1 (the cancel named attempt 2)", r.Status, r.Attempt)
	}
}
