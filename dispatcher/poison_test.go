package dispatcher

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A producer stores jobs that look like the server's status messages (no
// body, "Status: 404 / No Messages" or "409 / Consumer Deleted") ahead of
// another tenant's job at the same priority. Each is a message on JOBS like
// any other: it ends failed invalid_request, and the job behind it runs.
// nats.go's Fetch took them for the server's own status and ended each pull
// there, never acking them; the jobs behind came back only after the ack
// wait, again behind them, for ever (red team round 17, tenant F1).
// Mutation caught: fetch through the consumer's FetchNoWait again (b's job
// never runs).
func TestStatusLookalikeJobsDoNotStallThePull(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w1", 4, []string{"m"}, nil)
	for i, st := range [][2]string{{"404", "No Messages"}, {"409", "Consumer Deleted"}, {"408", "Request Timeout"}} {
		m := nats.NewMsg(subjects.Job("a", "normal", "poison"+string(rune('0'+i))))
		m.Header.Set("Status", st[0])
		m.Header.Set("Description", st[1])
		if _, err := e.js.PublishMsg(t.Context(), m); err != nil {
			t.Fatal(err)
		}
	}
	b := newJob("behind", "m", "normal")
	b.Tenant, b.ReplyTo = "b", bus.ReplySubject("b", "behind")
	e.mustSubmit(b)
	_, _ = runDispatcher(t, testConfig("d1", e.connect("d1")))
	if r := e.waitTenantResult("b", "behind", 10*time.Second); r.Status != schemas.StatusCompleted || r.Attempt != 1 {
		t.Fatalf("b's job behind the lookalikes: %s at attempt %d (%+v)", r.Status, r.Attempt, r.Error)
	}
	for i := range 3 {
		id := "poison" + string(rune('0'+i))
		if r := e.waitTenantResult("a", id, 10*time.Second); r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != schemas.CodeInvalidRequest {
			t.Errorf("lookalike %s: %s (%+v), want failed invalid_request", id, r.Status, r.Error)
		}
	}
	waitFor(t, 10*time.Second, "JOBS empty", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })
}
