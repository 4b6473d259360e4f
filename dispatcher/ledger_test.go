package dispatcher

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A rolling restart hands the jobs a dispatcher holds but has not placed back
// to JOBS, and each hand-back is a delivery. Counted as attempts, five
// graceful restarts failed a job that never ran attempts_exhausted (the
// operator red team: six restarts 3 s apart). With the hand-back noted in the
// ledger the job runs, as attempt 1, once a worker for its model is back.
// Mutation caught: dispatcher/ledger.go handBackLocked writing no entry
// (`if j.deliv == 0` → `if true`): the fourth dispatcher ends the job
// attempts_exhausted at intake.
func TestGracefulRestartsUseNoAttempt(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w1", 2, []string{"other"}, nil) // free slots: credit to pull with
	e.announce("later")                            // its worker is away: the job waits
	j := newJob("rolled", "later", "normal")
	key := subjects.JobRef{ID: j.ID}.Key()
	e.mustSubmit(j)
	const restarts = 5 // more than MaxAttempts (3)
	noted := int64(0)
	for i := range restarts {
		cfg := testConfig(fmt.Sprintf("d%d", i), e.connect(fmt.Sprintf("d%d", i)))
		cfg.ModelWait = time.Minute
		d, stop := runDispatcher(t, cfg)
		waitFor(t, 10*time.Second, fmt.Sprintf("dispatcher %d holding the job", i), func() bool {
			d.mu.Lock()
			defer d.mu.Unlock()
			h := d.jobs[key]
			return h != nil && h.inQueue && h.state == StateQueued
		})
		stop()
		noted += d.Metrics().HandBacksNoted.Load()
	}
	if noted != restarts {
		t.Fatalf("%d hand-backs noted, want %d", noted, restarts)
	}
	w := e.startWorker("w2", 2, []string{"later"}, nil)
	cfg := testConfig("d-last", e.connect("d-last"))
	cfg.ModelWait = time.Minute
	runDispatcher(t, cfg)
	r := e.waitResult(j.ID, 15*time.Second)
	if r.Status != schemas.StatusCompleted || r.Attempt != 1 {
		t.Fatalf("after %d graceful restarts: %s at attempt %d (%+v), want completed at attempt 1", restarts, r.Status, r.Attempt, r.Error)
	}
	_, _, batches := w.Snapshot()
	if len(batches) != 1 || batches[0].Jobs[0].Attempt != 1 {
		t.Fatalf("the worker was offered %+v, want one batch at attempt 1", batches)
	}
	// The entry goes with the record.
	waitFor(t, 5*time.Second, "the ledger entry dropped", func() bool { return e.streamMsgs(subjects.StreamLedger) == 0 })
}

// A job retried in-process runs attempts 1 and 2 on one delivery; the
// dispatcher then stops while the retry waits. Its next delivery must number
// the attempt 3: numbered from the delivery count (2), it reused attempt 2,
// and a caller's stream, which takes events of an attempt it has seen as
// repeats, dropped the new run's text. And the stop must not cost the job
// an attempt either: 3 is its last under MaxAttempts 3, and it runs.
// Mutation caught: dispatcher/ledger.go handBackLocked writing no entry
// (`if j.deliv == 0` → `if true`): the retry's own note then numbers the next
// delivery 4, past MaxAttempts, and the job fails having run twice (before
// the ledger: the third run was offered as attempt 2).
func TestAttemptNumbersRiseAcrossARestart(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	tc := startTwoCrashes(t, e, "renumbered", 3)
	tc.stop()
	runDispatcher(t, testConfig("d2", e.connect("d2")))
	r := e.waitResult(tc.job.ID, 15*time.Second)
	got := tc.offered()
	if !slices.Equal(got, []int{1, 2, 3}) || r.Status != schemas.StatusCompleted || r.Attempt != 3 {
		t.Fatalf("attempts offered %v, record %s at attempt %d (%+v); want 1, 2, 3 and completed at 3", got, r.Status, r.Attempt, r.Error)
	}
}

// A dispatcher that crashes while a retry waits writes no hand-back: the
// next delivery must still number after the retry noted before it started,
// so a killed dispatcher never makes a number run twice.
// Mutation caught: dispatcher/lifecycle.go without `d.noteRetry(j)`: the
// third run is offered as attempt 2.
func TestAttemptNumbersRiseAcrossACrash(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	tc := startTwoCrashes(t, e, "crashed", 5)
	// A crash: the connection goes without a nak, and no more in-progress
	// acks come; the message is redelivered after AckWait (2 s here).
	tc.nc.Close()
	cfg2 := testConfig("d2", e.connect("d2"))
	cfg2.MaxAttempts = 5
	runDispatcher(t, cfg2)
	r := e.waitResult(tc.job.ID, 20*time.Second)
	got := tc.offered()
	if len(got) != 3 || got[2] <= 2 || r.Status != schemas.StatusCompleted || r.Attempt != got[2] {
		t.Fatalf("attempts offered %v, record %s at attempt %d; want a third above 2 that completed", got, r.Status, r.Attempt)
	}
}

// twoCrashes is a job whose first two runs fail after a token, held by
// dispatcher d1 once its third attempt is noted and waits out a long backoff.
type twoCrashes struct {
	job  *schemas.JobRequest
	nc   *nats.Conn
	stop func()
	mu   sync.Mutex
	seen []int // attempts offered, in order
}

func (tc *twoCrashes) offered() []int {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	return slices.Clone(tc.seen)
}

func startTwoCrashes(t *testing.T, e *testEnv, id string, maxAttempts int) *twoCrashes {
	t.Helper()
	tc := &twoCrashes{}
	e.startWorker("w1", 2, []string{"m"}, func(aj schemas.AssignedJob) jobPlan {
		tc.mu.Lock()
		defer tc.mu.Unlock()
		tc.seen = append(tc.seen, aj.Attempt)
		if len(tc.seen) <= 2 {
			return jobPlan{Crash: 1} // one token, then a retryable failure
		}
		return jobPlan{}
	})
	tc.nc = e.connect("d1")
	cfg := testConfig("d1", tc.nc)
	cfg.MaxAttempts = maxAttempts
	cfg.BackoffMultiplier = 2000 // the second retry waits ~40 s: the stop comes first
	cfg.BackoffMax = time.Minute
	d1, stop := runDispatcher(t, cfg)
	tc.stop = stop
	tc.job = newJob(id, "m", "normal")
	key := subjects.JobRef{ID: id}.Key()
	e.mustSubmit(tc.job)
	waitFor(t, 10*time.Second, "attempt 2 failed, its retry noted and waiting", func() bool {
		n := len(tc.offered())
		d1.mu.Lock()
		defer d1.mu.Unlock()
		h := d1.jobs[key]
		return n == 2 && h != nil && h.state == StateRetrying && h.attempt == 2 && !h.noting
	})
	return tc
}
