package dispatcher

import (
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// TestShutdownFinishesTerminalWrite: a worker's terminal record is being
// written when the dispatcher is stopped, and the write only goes on once the
// stop has cancelled the dispatcher's other I/O (wctx) and waits for writes.
// The record must still be stored and the job acked, not naked to run again.
func TestShutdownFinishesTerminalWrite(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, nil)
	cfg := testConfig("d1", e.connect("d1"))
	cfg.NoDrain = true // nothing left running: only the write is in flight
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	entered := make(chan struct{})
	var once sync.Once
	d.writeHook = func() {
		once.Do(func() { close(entered) })
		// Until the stop has cancelled the dispatcher's other I/O and waits
		// for the writes, or cancelled the writes too.
		select {
		case <-d.awaiting:
		case <-d.tctx.Done():
		}
	}
	stop := runNew(t, d)
	j := newJob("sd-write", "m", "normal")
	e.mustSubmit(j)
	select {
	case <-entered:
	case <-time.After(15 * time.Second):
		t.Fatal("no terminal write began")
	}
	stop()
	r := e.waitResult(j.ID, 5*time.Second)
	if r.Status != schemas.StatusCompleted || r.Text != fullText(5) || r.Attempt != 1 {
		t.Fatalf("result %+v", r)
	}
	// Acked: gone from the work queue. Naked, it would stay for the next
	// dispatcher to run again.
	waitFor(t, 5*time.Second, "JOBS empty (acked)", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })
	if a, _, _ := w.Snapshot(); a[j.ID] != 1 {
		t.Fatalf("assigned %d times", a[j.ID])
	}
}

// TestShutdownTakesReceivedHandOver: a worker's hand-over has been received
// but not yet handled when the dispatcher is stopped without draining; it is
// handled only once the stop has cancelled the dispatcher's other I/O and
// waits for writes. The
// record must still be stored and the job acked, not naked to run again.
func TestShutdownTakesReceivedHandOver(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, nil)
	cfg := testConfig("d1", e.connect("d1"))
	cfg.NoDrain = true
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	entered := make(chan struct{})
	var once sync.Once
	d.handOverHook = func() {
		once.Do(func() { close(entered) })
		select {
		case <-d.awaiting:
		case <-d.tctx.Done():
		}
	}
	stop := runNew(t, d)
	j := newJob("sd-handover", "m", "normal")
	e.mustSubmit(j)
	select {
	case <-entered:
	case <-time.After(15 * time.Second):
		t.Fatal("no hand-over arrived")
	}
	// The hand-over can overtake the worker's answer to the assignment; an
	// assignment still unanswered at a stop without drain is handed back,
	// which is not what this test is about.
	waitFor(t, 5*time.Second, "job running", func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		held := d.jobs[subjects.JobRef{Tenant: j.Tenant, ID: j.ID}.Key()]
		return held != nil && held.state == StateRunning
	})
	stop()
	r := e.waitResult(j.ID, 5*time.Second)
	if r.Status != schemas.StatusCompleted || r.Attempt != 1 {
		t.Fatalf("result %+v", r)
	}
	waitFor(t, 5*time.Second, "JOBS empty (acked)", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })
	if a, _, _ := w.Snapshot(); a[j.ID] != 1 {
		t.Fatalf("assigned %d times", a[j.ID])
	}
}
