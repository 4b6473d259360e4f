package dispatcher

import (
	"slices"
	"sync"
	"sync/atomic"
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

// Only the unrun deliveries just before this one are left out of its number:
// a gap means another dispatcher held a delivery and may have numbered and
// offered an attempt from the raw count (red team round 21).
//
// Mutation caught: countedDeliveriesLocked without its contiguity check: the
// "gap" rows number below another holder's attempt: red.
func TestUnrunNotesCountOnlyAnUnbrokenRun(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		unrun []int // delivery counts this dispatcher handed back unchecked
		next  int   // the delivery being numbered
		want  int
	}{
		{"no notes", nil, 3, 3},
		{"first delivery", nil, 1, 1},
		{"a run just before", []int{1, 2}, 3, 1},
		{"a run after another's delivery", []int{2, 3}, 4, 2},
		{"gap: another held delivery 3", []int{1, 2}, 4, 4},
		{"run restarted after a gap", []int{1, 2, 4}, 5, 4},
		{"run restarted, then another gap", []int{1, 2, 4}, 6, 6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &Dispatcher{}
			for _, n := range tc.unrun {
				d.noteUnrunLocked(7, n, time.Now())
			}
			if got := d.countedDeliveriesLocked(7, tc.next); got != tc.want {
				t.Errorf("delivery %d after unrun %v numbered from %d, want %d", tc.next, tc.unrun, got, tc.want)
			}
		})
	}
}

// The round-21 race end to end: d1 hands J back unchecked twice; d2 takes
// the next delivery, offers it as attempt 3 and dies; d1's next number must
// be above 3, not 4 - 2 = 2 (which the real worker drops as older than the
// attempt it runs, leaving the job to attempt_timeout).
//
// Mutation caught: countedDeliveriesLocked without its contiguity check:
// offers [3 2]: red.
func TestUnrunNotesNeverNumberBelowAnotherRun(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	var mu sync.Mutex
	offered := map[string][]int{}
	w := e.startWorker("w1", 8, []string{"m"}, func(aj schemas.AssignedJob) jobPlan {
		mu.Lock()
		offered[aj.Job.ID] = append(offered[aj.Job.ID], aj.Attempt)
		mu.Unlock()
		return jobPlan{Block: true}
	})
	got := func(id string) []int { mu.Lock(); defer mu.Unlock(); return slices.Clone(offered[id]) }
	var block atomic.Bool
	gate := make(chan struct{})
	var entered atomic.Int32
	cfg := testConfig("d1", e.connect("d1"))
	cfg.MaxAttempts = 10
	d1, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	d1.fetchedHook = func() { // holds d1 in its pull loop while d2 takes J
		if block.Load() {
			entered.Add(1)
			<-gate
		}
	}
	defer runNew(t, d1)()
	ctx := testenv.Context(t, 60*time.Second)
	waitFor(t, 10*time.Second, "d1 sees w1", func() bool { d1.mu.Lock(); defer d1.mu.Unlock(); return d1.workers["w1"] != nil })
	if err := e.js.DeleteStream(ctx, subjects.StreamResults); err != nil {
		t.Fatal(err)
	}
	j := newJob("J", "m", "low")
	e.mustSubmit(j)
	notes := func() int {
		d1.mu.Lock()
		defer d1.mu.Unlock()
		n := 0
		for _, u := range d1.unrun.m {
			n = max(n, u.n)
		}
		return n
	}
	waitFor(t, 20*time.Second, "J handed back unchecked by d1", func() bool { return notes() >= 1 })
	block.Store(true)
	e.mustSubmit(newJob("X", "m", "high")) // a fetch that parks d1 in the hook
	waitFor(t, 10*time.Second, "d1 parked in its pull loop", func() bool { return entered.Load() > 0 })
	if err := jsprov.Provision(ctx, e.js, jsprov.Options{WorkerTTL: time.Minute}); err != nil {
		t.Fatal(err)
	}
	nc2 := e.connect("d2")
	cfg2 := testConfig("d2", nc2)
	cfg2.MaxAttempts = 10
	_, stop2 := runDispatcher(t, cfg2)
	defer stop2()
	waitFor(t, 20*time.Second, "J offered by d2", func() bool { return len(got("J")) >= 1 })
	nc2.Close() // d2 dies; its offer still runs on w1, its delivery comes back after AckWait
	close(gate)
	waitFor(t, 30*time.Second, "J offered again", func() bool { return len(got("J")) >= 2 })
	if a := got("J"); a[1] <= a[0] {
		t.Errorf("J offered as attempts %v: the later number is not above the earlier", a)
	}
	w.Release()
	if r := e.waitResult(j.ID, 30*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("J %s (%+v), want completed", r.Status, r.Error)
	}
}
