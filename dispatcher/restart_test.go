package dispatcher

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// TestWorkerRestartWithinTTLRetries: the worker is killed mid-stream and back
// under the same id long before the TTL (it never misses a heartbeat). Its new
// process knows nothing of the job; the dispatcher sees the new started_at,
// retries the job from the text already sent, and the worker stays routable:
// the retry runs on it.
func TestWorkerRestartWithinTTLRetries(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, func(aj schemas.AssignedJob) jobPlan {
		if aj.Attempt == 1 {
			return jobPlan{Restart: 3}
		}
		return jobPlan{}
	})
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	j := newJob("rs", "m", "normal")
	j.MaxTokens = 10
	c := e.listen(j.ReplyTo)
	e.mustSubmit(j)
	r := c.wait(t, 15*time.Second)
	want := fullText(10)
	if r.Status != schemas.StatusCompleted || r.Text != want || c.text() != want {
		t.Fatalf("status %s, caller saw %q, result %q, want %q", r.Status, c.text(), r.Text, want)
	}
	_, _, batches := w.Snapshot()
	if len(batches) != 2 {
		t.Fatalf("%d batches on the restarted worker, want 2", len(batches))
	}
	aj := batches[1].Jobs[0]
	if aj.Attempt != 2 || aj.Resume == nil || aj.Resume.Text != fullText(3) || aj.Resume.CompletionTokens != 3 {
		t.Fatalf("second attempt %d resume %+v", aj.Attempt, aj.Resume)
	}
	if m := d.Metrics(); m.WorkersRestarted.Load() != 1 || m.WorkersLost.Load() != 0 || m.Retries.Load() != 1 {
		t.Fatalf("restarted %d lost %d retries %d", m.WorkersRestarted.Load(), m.WorkersLost.Load(), m.Retries.Load())
	}
	waitFor(t, 5*time.Second, "JOBS empty (acked)", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })
}

// TestAcceptedByDeadProcessRetries: the worker's process takes a batch and dies;
// its answer reaches the dispatcher only after the next process's heartbeat.
// The job must not be taken as running on the new process, which never heard
// of it.
func TestAcceptedByDeadProcessRetries(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, nil)
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	var once sync.Once
	w.BeforeReply(func(schemas.AssignmentMsg) {
		once.Do(func() {
			old := w.StartedAt()
			w.RestartNow()
			// Not waitFor: this is the worker's goroutine, not the test's.
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
				d.mu.Lock()
				v := d.workers["w1"]
				seen := v != nil && !v.hb.StartedAt.Equal(old)
				d.mu.Unlock()
				if seen {
					return
				}
				if time.Now().After(deadline) {
					t.Errorf("the dispatcher did not see the new process")
					return
				}
			}
		})
	})
	j := newJob("dead-accept", "m", "normal")
	c := e.listen(j.ReplyTo)
	e.mustSubmit(j)
	r := c.wait(t, 15*time.Second)
	if r.Status != schemas.StatusCompleted || r.Text != fullText(5) || r.Attempt != 2 {
		t.Fatalf("result %+v", r)
	}
	if a, _, _ := w.Snapshot(); a["dead-accept"] != 2 {
		t.Fatalf("assigned %v", a)
	}
}

// TestSlotBackOnResult: a worker that heart-beats once and never again still
// gets job after job: the dispatcher gives a slot back when it sees the job's
// result or attempt report, never offering more than is free (the worker frees
// a slot before its end can be seen).
func TestSlotBackOnResult(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorkerWith("w1", 2, []string{"m"}, func(aj schemas.AssignedJob) jobPlan {
		if aj.Job.ID == "sb-3" && aj.Attempt == 1 {
			return jobPlan{Crash: 2}
		}
		return jobPlan{TokenGap: time.Millisecond}
	}, fakeWorkerOptions{HeartbeatEvery: time.Hour, Quiet: true, Silent: true})
	_, _ = runDispatcher(t, testConfig("d1", e.connect("d1")))
	for i := range 12 {
		e.mustSubmit(newJob(fmt.Sprintf("sb-%d", i), "m", "normal"))
	}
	for i := range 12 {
		e.waitResult(fmt.Sprintf("sb-%d", i), 20*time.Second)
	}
	checkNeverOverfilled(t, w, 2, 13) // 12 jobs and one retry
}

// retriedSignal is an Observer that closes its channel at the first retry.
type retriedSignal struct {
	nopObserver
	once sync.Once
	ch   chan struct{}
}

func (o *retriedSignal) Retried() { o.once.Do(func() { close(o.ch) }) }

// TestRestartResumesAfterQueuedTokens forces the interleaving behind the
// flaky TestWorkerRestartWithinTTLRetries: the worker sends three tokens and
// restarts, and the dispatcher handles the new process's heartbeat (and so
// fails the attempt) while all three token events still wait in the progress
// subscription's queue. The retry must still resume after all three: the
// events the dispatcher had received before it learnt of the restart count.
func TestRestartResumesAfterQueuedTokens(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, func(aj schemas.AssignedJob) jobPlan {
		if aj.Attempt == 1 {
			return jobPlan{Restart: 3}
		}
		return jobPlan{}
	})
	obs := &retriedSignal{ch: make(chan struct{})}
	cfg := testConfig("d1", e.connect("d1"))
	cfg.Observer = obs
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var hold sync.Once
	// The first progress event waits until the attempt has been failed; the
	// progress subscription's goroutine is the only one held.
	d.progressHook = func() { hold.Do(func() { <-obs.ch }) }
	runNew(t, d)
	j := newJob("rs-held", "m", "normal")
	j.MaxTokens = 10
	c := e.listen(j.ReplyTo)
	e.mustSubmit(j)
	r := c.wait(t, 15*time.Second)
	if r.Status != schemas.StatusCompleted || r.Text != fullText(10) {
		t.Fatalf("result %+v", r)
	}
	_, _, batches := w.Snapshot()
	if len(batches) != 2 {
		t.Fatalf("%d batches, want 2", len(batches))
	}
	aj := batches[1].Jobs[0]
	if aj.Attempt != 2 || aj.Resume == nil || aj.Resume.Text != fullText(3) || aj.Resume.CompletionTokens != 3 {
		t.Fatalf("second attempt %d resume %+v, want the 3 tokens sent", aj.Attempt, aj.Resume)
	}
	if c.text() != fullText(10) {
		t.Fatalf("caller saw %q, want %q", c.text(), fullText(10))
	}
}

// A live beat of another process of a worker id is followed whatever its
// start time reads: its host's clock may be behind the replaced process's.
// Ignored, the replacement stayed unroutable on every dispatcher that had
// known the old process (red team round 18, final review). A replayed entry
// of an earlier process is still ignored.
// Mutation caught: heartbeat ignoring every earlier start time (the
// replacement never followed).
func TestLiveBeatOfAReplacementWithAnEarlierClockIsFollowed(t *testing.T) {
	t.Parallel()
	d, now := hearingDispatcher(t, time.Now(), true)
	replacement := schemas.HeartbeatMsg{WorkerID: "w1", Models: []string{"m"}, Slots: 4, State: schemas.WorkerReady,
		StartedAt: now.Add(-time.Hour), UpdatedAt: now}
	d.mu.Lock()
	d.heartbeat("w1", replacement, time.Time{}, false) // a replay: ignored
	replayed := d.workers["w1"].hb.StartedAt
	d.heartbeat("w1", replacement, time.Time{}, true)
	followed := d.workers["w1"].hb.StartedAt
	d.mu.Unlock()
	if !replayed.Equal(now) {
		t.Fatalf("a replayed entry of an earlier process was followed (started_at %v)", replayed)
	}
	if !followed.Equal(replacement.StartedAt) {
		t.Fatalf("the live beat of the replacement was ignored (started_at %v, want %v)", followed, replacement.StartedAt)
	}
	if n := d.Metrics().WorkersRestarted.Load(); n != 1 {
		t.Fatalf("%d restarts counted, want 1", n)
	}
}
