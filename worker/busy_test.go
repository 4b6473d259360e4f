package worker

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A runtime that refuses the first generates runtime_busy (its compile threads
// full) costs the job no attempt: the worker tries again and the job completes
// at attempt 1, with no attempt report and a stream that saw nothing of it.
//
// Mutation caught: runJob calling c.Generate instead of generateWhenFree (the
// attempt is reported runtime_busy and no record comes).
func TestRuntimeBusyIsTriedAgainNotReported(t *testing.T) {
	b := startBus(t, 0)
	cfg := fakeConfig(t, b, "w-busy", 0)
	cfg.RuntimeEnv = append(cfg.RuntimeEnv, "FAKE_BUSY_FIRST=3")
	a := startAgent(t, cfg, true)
	reports := attemptReports(t, b.nc, a.ID())
	ctx := within(t, 30*time.Second)

	j := newJob("structured, say", 4)
	c := collect(t, b.nc, j.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", j)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	r := c.untilResult(ctx)
	if r.Status != schemas.StatusCompleted || r.Attempt != 1 || r.Text != "t0 t1 t2 t3 " {
		t.Fatalf("result %s at attempt %d, text %q; want completed at attempt 1 with every token", r.Status, r.Attempt, r.Text)
	}
	c.checkStream("")
	select {
	case m := <-reports:
		t.Fatalf("attempt reported: %s", m.Data)
	default:
	}
}

// A cancel while the worker waits out a busy runtime ends the job at once,
// cancelled, not after the wait.
//
// Mutation caught: generateWhenFree's two stop checks removed (r.reason() and
// the stopCh case: the job keeps trying for busyRetryFor, past the deadline).
func TestRuntimeBusyWaitEndsOnCancel(t *testing.T) {
	b := startBus(t, 0)
	cfg := fakeConfig(t, b, "w-busy-cancel", 0)
	cfg.RuntimeEnv = append(cfg.RuntimeEnv, "FAKE_BUSY_FIRST=1000")
	a := startAgent(t, cfg, true)
	ctx := within(t, busyRetryFor/2)

	j := newJob("never compiles", 4)
	c := collect(t, b.nc, j.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", j)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	cm, _ := json.Marshal(schemas.CancelMsg{JobID: j.ID, Tenant: j.Tenant, Attempt: 1, Reason: "client gave up", RequestedAt: time.Now().UTC()})
	if err := b.nc.PublishRequest(subjects.WorkerCancel(a.ID()), b.nc.NewInbox(), cm); err != nil {
		t.Fatal(err)
	}
	if r := c.untilResult(ctx); r.Status != schemas.StatusCancelled || r.Attempt != 1 {
		t.Fatalf("result %s at attempt %d, want cancelled at attempt 1", r.Status, r.Attempt)
	}
}
