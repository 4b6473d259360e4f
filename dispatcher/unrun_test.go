package dispatcher

import (
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Deliveries handed back because intake could not read RESULTS (a cluster
// electing a leader answers 503; here RESULTS is deleted, then made again)
// ran nothing and use no attempt: with max_attempts 3 and five such
// deliveries the job still completes at attempt 1. In a full-suite run a
// JOBS-leader kill gave ~8 s of 503s, each 1 s nak burnt a delivery, and 8
// jobs ended attempts_exhausted at attempt 0 without a run
// (TestClusterLosesNothing).
//
// Mutation caught: intake numbering from the raw delivery count
// (countedDeliveriesLocked not applied): attempts_exhausted: red.
func TestFailedChecksUseNoAttempt(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w1", 4, []string{"m"}, nil)
	cfg := testConfig("d1", e.connect("d1"))
	d, stop := runDispatcher(t, cfg)
	defer stop()
	ctx := testenv.Context(t, 30*time.Second)
	waitFor(t, 10*time.Second, "d1 running and seeing w1", func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.workers["w1"] != nil
	})
	if err := e.js.DeleteStream(ctx, subjects.StreamResults); err != nil {
		t.Fatal(err)
	}
	j := newJob("unchecked", "m", "normal")
	e.mustSubmit(j)
	waitFor(t, 20*time.Second, "five deliveries handed back unchecked", func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		for _, u := range d.unrun.m {
			if u.n >= 5 {
				return true
			}
		}
		return false
	})
	if err := jsprov.Provision(ctx, e.js, jsprov.Options{WorkerTTL: time.Minute}); err != nil {
		t.Fatal(err)
	}
	if r := e.waitResult(j.ID, 15*time.Second); r.Status != schemas.StatusCompleted || r.Attempt != 1 {
		t.Fatalf("%s at attempt %d (%+v), want completed at attempt 1", r.Status, r.Attempt, r.Error)
	}
}
