package dispatcher

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// An assignment lost to the dispatcher's own connection (it drops during the
// request, as in a NATS restart) uses no attempt: with max_attempts 1 the job
// still runs, at attempt 2 (the worker may have taken the lost batch, so the
// number rises). Red team round 22: 20 restarts of a standalone server ended
// 2 of 300 jobs attempts_exhausted that never ran. Here the worker drops the
// dispatcher's connection when an offer arrives, so its answer is lost. An
// outage at every offer still ends the job: at most max_attempts are spared.
//
// Mutations caught: assign without the spared attempt (outage never set):
// "once" ends failed attempts_exhausted at attempt 1: red; without the bound
// on spared attempts: "always" runs to attempt 100: red.
func TestAssignmentLostToAnOutageUsesNoAttempt(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		lose    func(offer int32) bool
		status  string
		attempt int
	}{
		{"once", func(offer int32) bool { return offer == 1 }, schemas.StatusCompleted, 2},
		{"always", func(int32) bool { return true }, schemas.StatusFailed, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, jsprov.Options{})
			nc := e.connect("d1")
			var offers atomic.Int32
			e.startWorkerWith("w1", 4, []string{"m"}, nil, fakeWorkerOptions{Full: func(schemas.AssignmentMsg) (bool, int) {
				if tc.lose(offers.Add(1)) {
					_ = nc.ForceReconnect() // the dispatcher's request fails: its answer cannot reach it
					return true, 4          // and it is taken for nothing
				}
				return false, 0
			}})
			cfg := testConfig("d1", nc)
			cfg.MaxAttempts = 1
			cfg.BackoffInitial, cfg.BackoffMax = 10*time.Millisecond, 10*time.Millisecond
			runDispatcher(t, cfg)
			j := newJob("outage-"+tc.name, "m", "normal")
			e.mustSubmit(j)
			r := e.waitResult(j.ID, 20*time.Second)
			if r.Status != tc.status || r.Attempt != tc.attempt {
				t.Fatalf("%s at attempt %d (%+v); want %s at attempt %d", r.Status, r.Attempt, r.Error, tc.status, tc.attempt)
			}
		})
	}
}

// The attempts spared by an outage travel with the ledger: a later delivery
// (another dispatcher, a restart) leaves them out of max_attempts too. One
// offer lost (spared), attempt 2 noted; the next delivery runs attempt 3 with
// two of them counted. Round 22's second pass: the spare lived in memory
// only, and a redelivery counted it, ending the job attempts_exhausted one
// attempt early and past the exhaust grace (exhaust.go).
// Mutations caught: retryEntry without Spared, or numberAttempt not reading
// it: counted 3: red.
func TestSparedAttemptsTravelWithTheLedger(t *testing.T) {
	held := &job{seq: 7, deliv: 1, attempt: 1, spared: 1}
	entry := held.retryEntry()
	next := &job{seq: 7}
	next.numberAttempt(entry, 2)
	if next.attempt != 3 || next.counted() != 2 {
		t.Fatalf("the next delivery runs attempt %d with %d counted; want attempt 3, 2 counted", next.attempt, next.counted())
	}
}
