package dispatcher

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
)

// The puller fetches the next jobs while a batch is checked (intakeAll). Two
// things must hold however the checks interleave: what is being checked
// counts against credit, and verdicts reach the queues in stream order.

// TestCreditCountsChecksInFlight: with every check held before it registers
// its job, the puller stops at free slots + MaxBatch (4 + 8) deliveries: credit
// counts the fetched deliveries not yet in d.jobs. Counted only once
// registered, the puller took the whole queue while the checks were out.
func TestCreditCountsChecksInFlight(t *testing.T) {
	t.Parallel()
	const slots, maxBatch, queued = 4, 8, 30
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", slots, []string{"m"}, nil)
	cfg := testConfig("d1", e.connect("d1"))
	cfg.MaxBatch = maxBatch
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	entered, release := make(chan string, queued), make(chan struct{})
	d.checkHook = func(id string) { entered <- id; <-release }
	runNew(t, d)
	free := sync.OnceFunc(func() { close(release) })
	t.Cleanup(free) // before the stop: Run waits for the checks
	for i := range queued {
		e.mustSubmit(newJob(fmt.Sprintf("cf-%02d", i), "m", "normal"))
	}
	for range slots + maxBatch {
		select {
		case <-entered:
		case <-time.After(10 * time.Second):
			t.Fatal("the first credit's checks did not start")
		}
	}
	d.mu.Lock()
	unchecked, held := d.unchecked, len(d.jobs)
	d.mu.Unlock()
	if c := d.credit(); c != 0 || unchecked != slots+maxBatch || held != 0 {
		t.Fatalf("credit %d with %d deliveries in their checks and %d held; want 0, %d, 0", c, unchecked, held, slots+maxBatch)
	}
	info, err := d.consumers[priorityIndex("normal")].Info(context.Background())
	if err != nil || info.NumAckPending != slots+maxBatch {
		t.Fatalf("consumer %+v (%v): want %d delivered and unacked", info, err, slots+maxBatch)
	}
	free()
	for i := range queued {
		e.waitResult(fmt.Sprintf("cf-%02d", i), 20*time.Second)
	}
	checkNeverOverfilled(t, w, slots, queued) // each job placed once
}

// TestIntakeAppliesInStreamOrder: a delivery whose check ends first waits for
// every delivery fetched before it: while the first job's check is held, the
// jobs pulled after it are checked but neither queued nor placed, and the
// first job is placed first once released. Two cases: the later jobs fetched
// in later batches (so-0 was fetched alone), and in so-0's own batch (all
// stored before the dispatcher starts). Applied as soon as their own checks
// ended, the later jobs ran ahead of it.
func TestIntakeAppliesInStreamOrder(t *testing.T) {
	t.Parallel()
	for _, sameBatch := range []bool{false, true} {
		t.Run(fmt.Sprintf("same_batch=%v", sameBatch), func(t *testing.T) {
			t.Parallel()
			intakeInOrder(t, sameBatch)
		})
	}
}

func intakeInOrder(t *testing.T, sameBatch bool) {
	const later = 5
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 8, []string{"m"}, nil)
	d, err := New(testConfig("d1", e.connect("d1")))
	if err != nil {
		t.Fatal(err)
	}
	entered, release := make(chan struct{}), make(chan struct{})
	checked := make(chan struct{}, later+1)
	d.checkHook = func(id string) {
		if id == "so-0" {
			close(entered)
			<-release
		}
	}
	d.checkedHook = func() { checked <- struct{}{} }
	submitLater := func() {
		for i := 1; i <= later; i++ {
			e.mustSubmit(newJob(fmt.Sprintf("so-%d", i), "m", "normal"))
		}
	}
	e.mustSubmit(newJob("so-0", "m", "normal"))
	if sameBatch {
		submitLater()
	}
	runNew(t, d)
	free := sync.OnceFunc(func() { close(release) })
	t.Cleanup(free) // before the stop: Run waits for the checks
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("so-0's check did not start")
	}
	if !sameBatch {
		submitLater() // so-0 was fetched alone: these come in later batches
	}
	for range later {
		select {
		case <-checked:
		case <-time.After(10 * time.Second):
			t.Fatal("the later jobs' checks did not end")
		}
	}
	d.mu.Lock()
	for i := 1; i <= later; i++ {
		j := d.jobs[subjects.JobRef{ID: fmt.Sprintf("so-%d", i)}.Key()]
		if j == nil || !j.intaking || j.inQueue || j.state != StateQueued {
			d.mu.Unlock()
			if j == nil {
				t.Fatalf("so-%d not held", i)
			}
			t.Fatalf("so-%d applied ahead of so-0, whose check is out: intaking %v, queued %v, state %v", i, j.intaking, j.inQueue, j.state)
		}
	}
	d.mu.Unlock()
	free()
	for i := 0; i <= later; i++ {
		e.waitResult(fmt.Sprintf("so-%d", i), 20*time.Second)
	}
	a, order, _ := w.Snapshot()
	if len(order) != later+1 || order[0] != "so-0" {
		t.Fatalf("placed in the order %v, want so-0 first, each once", order)
	}
	for id, n := range a {
		if n != 1 {
			t.Fatalf("%s ran %d times", id, n)
		}
	}
}
