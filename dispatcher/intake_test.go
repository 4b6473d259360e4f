package dispatcher

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// TestCreditBoundsWhatIsHeld: with a deep queue, a dispatcher holds the jobs
// on its workers, plus what their free slots can take, plus one batch
// (MaxBatch), no more: the rest wait in JetStream, so its memory follows the
// fleet's slots, never the queue's depth. Two fleets: one saturated (no free
// slot: nothing more is pulled), one with free slots only for another model
// (heldCap times those slots and one batch are held, waiting, so that a job
// of the other model behind them is reached: crossmodel_test.go).
func TestCreditBoundsWhatIsHeld(t *testing.T) {
	t.Parallel()
	const slots, maxBatch, queued = 4, 2, 60
	for _, otherSlots := range []int{0, 3} {
		t.Run(fmt.Sprintf("free=%d", otherSlots), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, jsprov.Options{})
			w := e.startWorker("w1", slots, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Block: true} })
			if otherSlots > 0 {
				e.startWorker("w2", otherSlots, []string{"other"}, nil)
			}
			cfg := testConfig("d1", e.connect("d1"))
			cfg.MaxBatch = maxBatch
			cfg.ModelWait = time.Hour
			d, _ := runDispatcher(t, cfg)
			for i := range queued {
				e.mustSubmit(newJob(fmt.Sprintf("cb-%02d", i), "m", "normal"))
			}
			want := slots + maxBatch
			if otherSlots > 0 {
				want = slots + heldCap*(otherSlots+maxBatch)
			}
			waitFor(t, 10*time.Second, "the worker full and the credit used", func() bool {
				a, _, _ := w.Snapshot()
				d.mu.Lock()
				held := len(d.jobs) // a pulled job is counted before intake holds it
				d.mu.Unlock()
				return len(a) == slots && d.Metrics().JobsPulled.Load() >= int64(want) && held >= want
			})
			d.mu.Lock()
			held, onWorker := len(d.jobs), d.onWorker
			d.mu.Unlock()
			if c := d.credit(); c != 0 || held != want || onWorker != slots {
				t.Fatalf("credit %d, holding %d (%d on the worker); want 0, %d (%d)", c, held, onWorker, want, slots)
			}
			if n := d.Metrics().JobsPulled.Load(); n != int64(want) {
				t.Fatalf("pulled %d, want %d", n, want)
			}
			w.Release()
			for i := range queued {
				e.waitResult(fmt.Sprintf("cb-%02d", i), 20*time.Second)
			}
		})
	}
}

// TestPullGivesEmptyPrioritiesCreditToOthers: one job of credit, the weighted
// pick lands on high first (weight 4), whose queue is empty; the job waiting
// in normal is still pulled in the same round of pulls, not left to the next
// wake-up.
func TestPullGivesEmptyPrioritiesCreditToOthers(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	d, ctx := attachedOnly(t, e)
	e.mustSubmit(newJob("n1", "m", "normal"))
	// JetStream acks the publish before it tells the consumer (storedGrace):
	// wait until a no-wait pull can see the job.
	waitFor(t, 10*time.Second, "the consumer sees n1", func() bool {
		info, err := d.consumers[priorityIndex(schemas.PriorityNormal)].Info(ctx)
		return err == nil && info.NumPending == 1
	})
	if p := d.pullWRR.pick([schemas.NumPriorities]bool{true, true, true}); schemas.Priorities[p] != schemas.PriorityHigh {
		t.Fatalf("first pick %s, want high", schemas.Priorities[p])
	}
	if got := d.pullOnce(ctx, 1); got != 1 {
		t.Fatalf("pulled %d, want the normal job", got)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if j := d.jobs[subjects.JobRef{ID: "n1"}.Key()]; j == nil || j.state != StateQueued {
		t.Fatalf("n1 not held as queued: %+v", j)
	}
}

// TestFinishedJobIsNotRunOnFirstDelivery: a job whose terminal record is
// already in RESULTS is acked without running even on its first delivery
// (NumDelivered 1): a crashed server forgets delivery counts it had not
// flushed, a cluster's new leader may not know the earlier delivery, and a
// finished job's id submitted again is a new message. The record stays the
// first one.
func TestFinishedJobIsNotRunOnFirstDelivery(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 4, []string{"m"}, nil)
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	ctx := testenv.Context(t, 20*time.Second)
	first := &schemas.ResultMsg{Type: "result", JobID: "fin", Attempt: 1, Status: schemas.StatusCompleted, FinishReason: "stop", Model: "m", Text: "earlier run", WorkerID: "w0", FinishedAt: time.Now().UTC()}
	if err := results.Record(ctx, e.js, first); err != nil {
		t.Fatal(err)
	}
	e.mustSubmit(newJob("fin", "m", "normal"))
	waitFor(t, 10*time.Second, "the delivery acked", func() bool {
		return d.Metrics().AlreadyFinished.Load() == 1 && e.streamMsgs(subjects.StreamJobs) == 0
	})
	if a, _, _ := w.Snapshot(); a["fin"] != 0 {
		t.Fatalf("a finished job ran again: %v", a)
	}
	if r := e.waitResult("fin", time.Second); r.Text != "earlier run" {
		t.Fatalf("record %+v", r)
	}
}

// TestAwaitStoredWaitsForTheAnnouncedJob: JetStream announces a stored job
// (and acks its publish) before its consumers know of it, when a no-wait pull
// still finds nothing; awaitStored's pull waits for it. The announcement comes
// first here, the job after it, with a grace long enough to stand for that
// moment on any machine.
func TestAwaitStoredWaitsForTheAnnouncedJob(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	d, ctx := attachedOnly(t, e)
	d.storedGrace = 10 * time.Second
	now := time.Now()
	d.mu.Lock()
	d.heartbeat("w1", schemas.HeartbeatMsg{WorkerID: "w1", Models: []string{"m"}, Slots: 4, State: schemas.WorkerReady, StartedAt: now, UpdatedAt: now}, now, true)
	d.mu.Unlock()
	if d.credit() <= 0 {
		t.Fatal("no credit")
	}
	normal := priorityIndex(schemas.PriorityNormal)
	d.storedSeq[normal].Store(1) // the wake-up of the job below
	got := make(chan int, 1)
	go func() { got <- d.awaitStored(ctx) }()
	e.mustSubmit(newJob("late", "m", "normal"))
	if n := <-got; n != 1 {
		t.Fatalf("awaitStored pulled %d, want the announced job", n)
	}
	if d.awaitStored(ctx) != 0 {
		t.Fatal("an announcement was waited for twice")
	}
}

// attachedOnly is a dispatcher attached to the bus (consumers made) that does
// not run: a test drives its pulls itself, under ctx.
func attachedOnly(t *testing.T, e *testEnv) (*Dispatcher, context.Context) {
	t.Helper()
	d, err := New(testConfig("d1", e.connect("d1")))
	if err != nil {
		t.Fatal(err)
	}
	ctx := testenv.Context(t, 20*time.Second)
	if err := d.attach(ctx); err != nil {
		t.Fatal(err)
	}
	d.wctx = ctx
	return d, ctx
}
