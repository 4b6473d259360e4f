package dispatcher

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A record the store refuses (here RESULTS at a message limit; in the
// operator round a full disk) is counted where an operator can alert on it and
// tried again while the dispatcher holds the job: once the store takes writes,
// the record the run earned is the one stored, under that run's attempt, and
// the job ran once. Meanwhile no new job is placed. Before, the delivery was
// handed back: each refusal reran the job and used an attempt, so a job with
// one attempt ended attempts_exhausted although its run had succeeded.
// Mutations caught: writeTerminal without d.count().writeFailed() (retryWrite's
// count; the count stays 0); retryWrite returning at once (the nak: "refused"
// runs twice and ends attempts_exhausted); schedule without its
// refusingWrites check ("held" runs while the store refuses); retryWrite
// without its keep-alive ticker (the delivery comes back past AckWait and
// ends attempts_exhausted).
func TestRefusedRecordWriteIsRetriedNotRerun(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.limitResults(1)
	var mu sync.Mutex
	runs := map[string]int{}
	e.startWorker("w1", 2, []string{"m"}, func(a schemas.AssignedJob) jobPlan {
		mu.Lock()
		runs[a.Job.ID]++
		mu.Unlock()
		return jobPlan{TokenGap: 2 * time.Millisecond}
	})
	ran := func(id string) int {
		mu.Lock()
		defer mu.Unlock()
		return runs[id]
	}
	cfg2 := testConfig("d1", e.connect("d1"))
	cfg2.MaxAttempts = 1
	d, _ := runDispatcher(t, cfg2)
	first := newJob("fills", "m", "normal")
	if r := e.waitResultAfter(first, 15*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("first job: %+v", r)
	}
	second := newJob("refused", "m", "normal")
	e.mustSubmit(second)
	waitFor(t, 15*time.Second, "a refused record write counted", func() bool { return d.Metrics().RecordWriteFailures.Load() > 0 })
	held := newJob("held", "m", "normal")
	e.mustSubmit(held)
	// Six more refused tries (~5 s of backoff, past twice the 2 s AckWait, so
	// the delivery must be kept alive): "held" had every chance to be placed.
	n := d.Metrics().RecordWriteFailures.Load()
	waitFor(t, 20*time.Second, "the record tried again", func() bool { return d.Metrics().RecordWriteFailures.Load() >= n+6 })
	if k := ran(held.ID); k != 0 {
		t.Fatalf("a job was placed while the store refused records (ran %d times)", k)
	}
	e.limitResults(-1)
	r := e.waitResult(second.ID, 20*time.Second)
	if r.Status != schemas.StatusCompleted || r.Attempt != 1 || ran(second.ID) != 1 {
		t.Fatalf("after the store took writes again: %+v, ran %d times; want completed at attempt 1, run once", r, ran(second.ID))
	}
	if r := e.waitResult(held.ID, 20*time.Second); r.Status != schemas.StatusCompleted || ran(held.ID) != 1 {
		t.Fatalf("the job held back: %+v, ran %d times", r, ran(held.ID))
	}
	// A delivery let lapse past AckWait comes back, finds its attempts used
	// and writes a dead letter (and a rival record) of its own.
	if n := e.streamMsgs(subjects.StreamDLQ); n != 0 {
		t.Fatalf("%d dead letters: the refused job's delivery came back while its record was held", n)
	}
}

// Hand-overs go on while records wait to be written again: 40 jobs end while
// the store refuses records, and all 40 records are held for their retries.
// When writes held the hand-over slots (32), the 33rd hand-over waited
// unread; its worker timed out, reported the attempt for retry, and the
// record, read at last, was refused as a superseded attempt's: the job ran
// again. Mutation caught: releasing the slot after the write in
// onDoneConcurrently (the count stops at 32).
func TestHandOversGoOnWhileRecordsAreRetried(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.limitResults(1)
	const n = maxHandOvers + 8
	// Held jobs wait for Release, so all n are placed before any ends (the
	// dispatcher places nothing once a record is refused).
	w := e.startWorker("w1", n, []string{"m"}, func(a schemas.AssignedJob) jobPlan {
		return jobPlan{TokenGap: time.Millisecond, Block: strings.HasPrefix(a.Job.ID, "held-")}
	})
	cfg2 := testConfig("d1", e.connect("d1"))
	cfg2.MaxBatch = n
	obs := &heldObserver{}
	cfg2.Observer = obs
	d, _ := runDispatcher(t, cfg2)
	if r := e.waitResultAfter(newJob("fills", "m", "normal"), 15*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("first job: %+v", r)
	}
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("held-%02d", i)
		e.mustSubmit(newJob(ids[i], "m", "normal"))
	}
	waitFor(t, 20*time.Second, fmt.Sprintf("%d jobs running", n), func() bool { return w.InFlight() == n })
	w.Release()
	waitFor(t, 20*time.Second, fmt.Sprintf("%d records held for retry", n), func() bool { return d.refusingWrites.Load() == n })
	if got := obs.held.Load(); got != n {
		t.Fatalf("the observer (mlx_dispatcher_records_held) says %d records held, want %d", got, n)
	}
	e.limitResults(-1)
	for _, id := range ids {
		if r := e.waitResult(id, 20*time.Second); r.Status != schemas.StatusCompleted || r.Attempt != 1 {
			t.Fatalf("%s: %+v", id, r)
		}
	}
	waitFor(t, 10*time.Second, "no record held", func() bool { return obs.held.Load() == 0 })
}

// heldObserver counts what RecordsHeld reports.
type heldObserver struct {
	nopObserver
	held atomic.Int64
}

func (o *heldObserver) RecordsHeld(delta int) { o.held.Add(int64(delta)) }

// A record publish the store does not answer holds placement once it has
// waited writeSlowAfter, and the hold ends with the write: a full disk answers
// no publish, and jobs placed while the first try waited out its timeout ran
// into the full store (the red team's full disk: 40 of them). Mutation
// caught: timedRecord without its AfterFunc (the count stays 0).
func TestSlowFirstWriteHoldsPlacement(t *testing.T) {
	t.Parallel()
	d := &Dispatcher{wakeSched: make(chan struct{}, 1)}
	release := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		g := &writeGate{d: d}
		try := func() error { return timedRecord(g, func() error { <-release; return nil }) }
		done <- d.retryWrite(context.Background(), g, try, func() {}, time.Hour, func(error) {})
	}()
	waitFor(t, 10*time.Second, "placement held by a slow write", func() bool { return d.refusingWrites.Load() == 1 })
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n := d.refusingWrites.Load(); n != 0 {
		t.Fatalf("placement still held by %d writes after the write landed", n)
	}
}

// limitResults sets RESULTS' message limit: 1 makes it full once it holds a
// record, so every later record is refused; -1 lifts the limit.
func (e *testEnv) limitResults(maxMsgs int64) {
	e.tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cfg := jsprov.StreamConfigs(jsprov.Options{})[subjects.StreamResults]
	cfg.MaxMsgs = maxMsgs
	if _, err := e.js.UpdateStream(ctx, cfg); err != nil {
		e.tb.Fatal(err)
	}
}
