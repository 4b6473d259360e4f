// Workers that answer offers full: a credential that lies about it, one that
// refuses and re-puts its registry entry as fast as it can, and an honest
// worker whose slots filled since the dispatcher counted them (red team round
// 11, F1).

package dispatcher

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/breaker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A worker credential that heart-beats 1,024 free slots and answers every
// offer full with free_slots = 1,024 contradicts itself: each such answer is
// a breaker failure, the breaker opens after BreakerThreshold of them, and
// every job runs on the honest worker, each at attempt 1. Before, the answer
// counted as a success and its free slots were believed: the liar was offered
// the same jobs thousands of times a second and some never ran while it was up.
// Mutation caught: batcher.go's full branch recording `w.br.Record(true, now)`
// for every full (the liar's breaker never opens; the wait for it times out).
func TestFullLiarOpensItsBreakerAndJobsRunElsewhere(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	const honestSlots, jobs = 4, 20
	h := e.startWorker("h", honestSlots, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Block: true} })
	liar := e.startWorkerWith("liar", 1024, []string{"m"}, nil, fakeWorkerOptions{
		Full: func(schemas.AssignmentMsg) (bool, int) { return true, 1024 },
	})
	cfg := testConfig("d1", e.connect("d1"))
	cfg.BreakerThreshold = 3
	cfg.BreakerCooldown = time.Hour // once open it stays open: no probes to count
	d, stop := runDispatcher(t, cfg)
	defer stop()

	for i := range jobs {
		e.mustSubmit(newJob(fmt.Sprintf("liar-%d", i), "m", schemas.PriorityNormal))
	}
	// h holds honestSlots jobs until released; the others can go only to the
	// liar, which is offered them until its breaker opens.
	liarBreaker := func() breaker.State {
		d.mu.Lock()
		defer d.mu.Unlock()
		if w := d.workers["liar"]; w != nil {
			return w.br.State()
		}
		return breaker.Closed
	}
	waitFor(t, 10*time.Second, "the liar's breaker open", func() bool { return liarBreaker() == breaker.Open })
	waitFor(t, 10*time.Second, "h full", func() bool { return h.InFlight() == honestSlots })
	h.Release()
	for i := range jobs {
		id := fmt.Sprintf("liar-%d", i)
		r := e.waitResult(id, 20*time.Second)
		if r.Status != schemas.StatusCompleted || r.WorkerID != "h" || r.Attempt != 1 {
			t.Fatalf("%s: %s on %q at attempt %d, want completed on h at 1", id, r.Status, r.WorkerID, r.Attempt)
		}
	}
	// Every offer to the liar left while its breaker was closed: the
	// threshold's answers, plus the offers still in flight when the last of
	// them opened it, at most one per other job (a job is in one offer at a
	// time; jobs pulled one by one go out one by one). Before, thousands.
	fulls := liar.Stats().Fulls
	t.Logf("the liar was offered %d batches", fulls)
	if most := cfg.BreakerThreshold + jobs - 1; fulls < cfg.BreakerThreshold || fulls > most {
		t.Fatalf("the liar was offered %d batches, want %d to %d", fulls, cfg.BreakerThreshold, most)
	}
	if _, order, _ := liar.Snapshot(); len(order) != 0 {
		t.Fatalf("the liar took %d jobs", len(order))
	}
	if st := liarBreaker(); st != breaker.Open {
		t.Fatalf("the liar's breaker %s at the end", st)
	}
}

// A worker that answers every offer full with no free slot (consistent, so
// no breaker failure) and re-puts its registry entry every 2 ms is offered a
// job at most once per refusalHold: each offer waits for a heartbeat after the
// refusal and for the hold since it. The gap between two offers as the worker
// sees them cannot be below the hold (the next offer leaves only once the
// hold has passed since the answer came back, which was after the worker saw
// the offer), however slow the machine: a bound by construction, not speed.
// Mutation caught: liftBlock without the `now.Before(at)` hold (each put lifts
// the block: offers a few ms apart); batcher.go's full branch without
// `w.block(now)` (F1's loop: busy, never blocked and never loaded, is offered
// a again and again and a never reaches h).
func TestRefusingWorkerIsOfferedAtMostOncePerHold(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	h := e.startWorker("h", 1, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Block: true} })
	var (
		mu     sync.Mutex
		offers []time.Time // to "busy", of job b
	)
	busy := e.startWorkerWith("busy", 8, []string{"m"}, nil, fakeWorkerOptions{
		HeartbeatEvery: 2 * time.Millisecond,
		Full: func(a schemas.AssignmentMsg) (bool, int) {
			if len(a.Jobs) == 1 && a.Jobs[0].Job.ID == "hold-b" {
				mu.Lock()
				offers = append(offers, time.Now())
				mu.Unlock()
			}
			return true, 0
		},
	})
	d, stop := runDispatcher(t, testConfig("d1", e.connect("d1")))
	defer stop()

	// a first takes h's only slot (offered to busy on the way, perhaps), so
	// that b, alone in the queue, has nowhere to go but busy, one offer at a
	// time.
	e.mustSubmit(newJob("hold-a", "m", schemas.PriorityNormal))
	waitFor(t, 10*time.Second, "a running on h", func() bool { return h.InFlight() == 1 })
	e.mustSubmit(newJob("hold-b", "m", schemas.PriorityNormal))
	const want = 5
	waitFor(t, 10*time.Second, "b offered to busy 5 times", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(offers) >= want
	})
	mu.Lock()
	got := append([]time.Time(nil), offers...)
	mu.Unlock()
	for i := 1; i < len(got); i++ {
		if gap := got[i].Sub(got[i-1]); gap < refusalHold {
			t.Fatalf("offers %d and %d to busy %v apart, under the %v hold", i-1, i, gap, refusalHold)
		}
	}
	d.mu.Lock()
	st := d.workers["busy"].br.State()
	d.mu.Unlock()
	if st != breaker.Closed {
		t.Fatalf("busy's breaker %s: a consistent full is no failure", st)
	}
	h.Release()
	for _, id := range []string{"hold-a", "hold-b"} {
		if r := e.waitResult(id, 20*time.Second); r.Status != schemas.StatusCompleted || r.WorkerID != "h" || r.Attempt != 1 {
			t.Fatalf("%s: %s on %q at attempt %d, want completed on h at 1", id, r.Status, r.WorkerID, r.Attempt)
		}
	}
	if _, order, _ := busy.Snapshot(); len(order) != 0 {
		t.Fatalf("busy took %d jobs", len(order))
	}
}

// An honest full (the worker's slots filled since this dispatcher counted
// them) in a one-worker fleet: the worker is offered nothing more until it
// heart-beats, and then the job runs there, at attempt 1, with the breaker
// closed. The worker heart-beats only when told, right after the refusal, so
// that heartbeat usually lands within refusalHold and the scheduler must look
// again once the hold is over.
// Mutation caught: heartbeat() without `w.heard = true` (the block never
// lifts: no result); liftBlocks returning zero instead of `next` (the
// heartbeat inside the hold is forgotten: no result).
func TestHonestFullRunsAfterTheNextHeartbeat(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	var calls atomic.Int32
	w := e.startWorkerWith("w1", 2, []string{"m"}, nil, fakeWorkerOptions{
		HeartbeatEvery: time.Hour, Quiet: true, Silent: true,
		Full: func(schemas.AssignmentMsg) (bool, int) { return calls.Add(1) == 1, 0 },
	})
	cfg := testConfig("d1", e.connect("d1"))
	cfg.WorkerTTL = time.Hour // w1 heart-beats only when the test says
	d, stop := runDispatcher(t, cfg)
	defer stop()

	e.mustSubmit(newJob("honest", "m", schemas.PriorityNormal))
	waitFor(t, 10*time.Second, "w1 refused the job and is blocked", func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		v := d.workers["w1"]
		return w.Stats().Fulls == 1 && v != nil && v.blocked
	})
	state := numStates // not held
	d.mu.Lock()
	for _, j := range d.jobs {
		if j.req.ID == "honest" {
			state = j.state
		}
	}
	d.mu.Unlock()
	if state != StateQueued {
		t.Fatalf("the refused job is %s while w1 is blocked, want queued", state)
	}
	w.Heartbeat()
	r := e.waitResult("honest", 10*time.Second)
	if r.Status != schemas.StatusCompleted || r.WorkerID != "w1" || r.Attempt != 1 {
		t.Fatalf("%s on %q at attempt %d, want completed on w1 at 1", r.Status, r.WorkerID, r.Attempt)
	}
	if n := w.Stats().Fulls; n != 1 {
		t.Fatalf("w1 answered full %d times, want 1", n)
	}
	d.mu.Lock()
	st := d.workers["w1"].br.State()
	d.mu.Unlock()
	if st != breaker.Closed {
		t.Fatalf("w1's breaker %s after an honest full", st)
	}
}
