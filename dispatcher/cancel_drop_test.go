package dispatcher

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go/jetstream"
)

// cancelsHeld counts the cancels CANCELS keeps for tenant's job id.
func (e *testEnv) cancelsHeld(tenant, id string) uint64 {
	e.tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := e.js.Stream(ctx, subjects.StreamCancels)
	if err != nil {
		e.tb.Fatal(err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(subjects.Cancel(tenant, id)))
	if err != nil {
		e.tb.Fatal(err)
	}
	var n uint64
	for _, c := range info.State.Subjects {
		n += c
	}
	return n
}

// A job's stored cancel goes once the job has its record: a queued job ended
// by it, a running one whose worker finished anyway, and a job cancelled after
// it ended. Before, every cancel stayed a day, and an HTTP tenant abandoning
// streamed requests filled CANCELS: no tenant's cancel was stored for the
// rest of the day (red team round 19, tenanthttp F1). A cancel of a job not
// submitted yet stays for it.
// Mutations caught: writeTerminal without dropCancel ("queued" and "running"
// keep theirs); cancelInStream not dropping an ended job's ("ended" keeps it).
func TestCancelIsDroppedOnceItsJobEnds(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 1, []string{"m"}, func(aj schemas.AssignedJob) jobPlan {
		if aj.Job.ID == "running" {
			return jobPlan{Block: true}
		}
		return jobPlan{}
	})
	forwarded := e.cancelsTo("w1")
	var running <-chan struct{}
	cfg := testConfig("d1", e.connect("d1"))
	cfg.Logger, running = logSignal(logRunning)
	runDispatcher(t, cfg)
	waitClosed(t, running, 20*time.Second, "dispatcher running")
	prod, err := bus.NewClient(e.nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	ended := newJob("ended", "m", "normal")
	e.mustSubmit(ended)
	if r := e.waitResult(ended.ID, 20*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("ended: %s", r.Status)
	}
	run := newJob("running", "m", "normal")
	e.mustSubmit(run)
	for assigned := false; !assigned; {
		select {
		case a := <-w.Assignments():
			for _, aj := range a.Jobs {
				assigned = assigned || aj.Job.ID == run.ID
			}
		case <-time.After(20 * time.Second):
			t.Fatal("the running job was never assigned")
		}
	}
	queued := newJob("queued", "m", "normal") // behind it: the worker's one slot is taken
	e.mustSubmit(queued)
	for _, id := range []string{"never", "queued", "running", "ended"} {
		if err := prod.Cancel(ctx, id, "stop"); err != nil {
			t.Fatal(err)
		}
	}
	if r := e.waitResult(queued.ID, 20*time.Second); r.Status != schemas.StatusCancelled {
		t.Fatalf("queued: %s, want cancelled", r.Status)
	}
	select {
	case <-forwarded:
	case <-time.After(20 * time.Second):
		t.Fatal("the running job's cancel was never forwarded")
	}
	w.Release() // the fake worker ignores cancels: it completes
	e.waitResult(run.ID, 20*time.Second)
	for _, id := range []string{"queued", "running", "ended"} {
		waitFor(t, 20*time.Second, "the cancel of "+id+" dropped", func() bool { return e.cancelsHeld("", id) == 0 })
	}
	if n := e.cancelsHeld("", "never"); n != 1 {
		t.Fatalf("the cancel of a job not submitted yet: %d kept, want 1", n)
	}
}

// A dropped cancel no longer cancels a new run of its job (a replay queues
// the same id again) on a dispatcher that remembered it without dropping it:
// here the one that did not hold the job when the cancel came. Before, that
// dispatcher ended the replayed job "cancelled while queued" (the final
// review of round 19).
// Mutation caught: intake without confirmCancel (the second run ends
// cancelled).
func TestDroppedCancelDoesNotCancelTheJobsNextRun(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	var runs atomic.Int32
	w := e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan {
		return jobPlan{Block: runs.Add(1) == 1}
	})
	cfg1, cfg2 := testConfig("d1", e.connect("d1")), testConfig("d2", e.connect("d2"))
	var running1, running2 <-chan struct{}
	cfg1.Logger, running1 = logSignal(logRunning)
	cfg2.Logger, running2 = logSignal(logRunning)
	d1, stop1 := runDispatcher(t, cfg1)
	d2, stop2 := runDispatcher(t, cfg2)
	waitClosed(t, running1, 20*time.Second, "d1 running")
	waitClosed(t, running2, 20*time.Second, "d2 running")

	j := newJob("again", "m", "normal")
	e.mustSubmit(j)
	var holder string
	select {
	case a := <-w.Assignments():
		holder = a.DispatcherID
	case <-time.After(20 * time.Second):
		t.Fatal("the job was never assigned")
	}
	other, stopHolder := d2, stop1
	if holder == "d2" {
		other, stopHolder = d1, stop2
	}
	prod, err := bus.NewClient(e.nc)
	if err != nil {
		t.Fatal(err)
	}
	if err := prod.Cancel(context.Background(), j.ID, "stop"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "the other dispatcher leaving the cancel to the holder", func() bool {
		return other.Metrics().CancelsLeft.Load() == 1
	})
	w.Release() // the fake worker ignores cancels: it completes
	if r := e.waitResult(j.ID, 20*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("first run: %s", r.Status)
	}
	waitFor(t, 20*time.Second, "the cancel dropped", func() bool { return e.cancelsHeld("", j.ID) == 0 })

	// The job queued again, as replay does, to the dispatcher that remembers
	// the cancel.
	stopHolder()
	if err := results.Purge(context.Background(), e.js, "", j.ID); err != nil {
		t.Fatal(err)
	}
	e.mustSubmit(newJob("again", "m", "normal"))
	if r := e.waitResult(j.ID, 20*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("the second run ended %s (%+v), want completed: the dropped cancel still ended it", r.Status, r.Error)
	}
}
