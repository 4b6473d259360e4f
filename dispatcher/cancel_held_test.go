package dispatcher

import (
	"context"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// With two dispatchers, the one that does not hold a running job leaves its
// cancel to the one that does (red team round 11, F4): the holder forwards the
// cancel to the worker, and the other no longer ends the job itself from JOBS —
// which wrote an attempt-0 record with no text and no usage over a job still
// streaming on its worker, and deleted its message from under its dispatcher.
// The fake worker ignores cancels, so once both dispatchers have acted on the
// cancel the job runs on, and its one record is the worker's, at attempt 1.
//
// Mutation caught: cancelInStream going on past its delivered check (the
// record is cancelled at attempt 0, written by the dispatcher that did not
// hold the job).
func TestCancelOfAJobHeldByAnotherDispatcher(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Block: true} })
	forwarded := e.cancelsTo("w1")
	// Both running (their stored cancels read) before the cancel: one still
	// reading them only remembers a cancel, as it should.
	cfg1, cfg2 := testConfig("d1", e.connect("d1")), testConfig("d2", e.connect("d2"))
	var running1, running2 <-chan struct{}
	cfg1.Logger, running1 = logSignal(logRunning)
	cfg2.Logger, running2 = logSignal(logRunning)
	d1, _ := runDispatcher(t, cfg1)
	d2, _ := runDispatcher(t, cfg2)
	waitClosed(t, running1, 20*time.Second, "d1 running")
	waitClosed(t, running2, 20*time.Second, "d2 running")

	j := newJob("held-elsewhere", "m", "normal")
	c := e.listen(j.ReplyTo)
	e.mustSubmit(j)
	var holder string
	select {
	case a := <-w.Assignments():
		holder = a.DispatcherID
	case <-time.After(20 * time.Second):
		t.Fatal("the job was never assigned")
	}
	other := d2
	if holder == "d2" {
		other = d1
	}
	prod, err := bus.NewClient(e.nc)
	if err != nil {
		t.Fatal(err)
	}
	if err := prod.Cancel(context.Background(), j.ID, "changed my mind"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-forwarded: // the holder asked the worker to stop it
	case <-time.After(20 * time.Second):
		t.Fatal("the holder never forwarded the cancel")
	}
	waitFor(t, 20*time.Second, "the other dispatcher leaving the cancel to the holder", func() bool {
		return other.Metrics().CancelsLeft.Load() == 1
	})
	w.Release()
	r := c.wait(t, 20*time.Second)
	if r.Status != schemas.StatusCompleted || r.Attempt != 1 || r.WorkerID != "w1" {
		t.Fatalf("record %s at attempt %d by worker %q (error %+v); want the worker's, completed at attempt 1", r.Status, r.Attempt, r.WorkerID, r.Error)
	}
}
