package dispatcher

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go/jetstream"
)

func TestCompletesAndAcks(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 4, []string{"m"}, nil)
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	j := newJob("job-1", "m", "normal")
	c := e.listen(j.ReplyTo)
	e.mustSubmit(j)
	r := c.wait(t, 10*time.Second)
	if r.Status != schemas.StatusCompleted || c.text() != fullText(5) || r.Text != fullText(5) {
		t.Fatalf("result %+v text %q", r, c.text())
	}
	waitFor(t, 5*time.Second, "JOBS empty (acked)", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })
	waitFor(t, 5*time.Second, "completed counted", func() bool { return d.Metrics().Completed.Load() == 1 })
	if a, _, _ := w.Snapshot(); a["job-1"] != 1 {
		t.Fatalf("assigned %v", a)
	}
}

func TestBatchingWithinWindow(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	cfg := testConfig("d1", e.connect("d1"))
	cfg.MaxWait = time.Hour // a short batch would wait for ever: every batch here must be full or the last of its model
	_, _ = runDispatcher(t, cfg)
	// Queued while no worker is up (nothing is pulled), so the first pull
	// takes them all at once.
	for i := range 8 {
		e.mustSubmit(newJob(fmt.Sprintf("a-%d", i), "a", "normal"))
	}
	for i := range 3 {
		e.mustSubmit(newJob(fmt.Sprintf("b-%d", i), "b", "normal"))
	}
	w := e.startWorker("w1", 16, []string{"a", "b"}, nil)
	for i := range 8 {
		e.waitResult(fmt.Sprintf("a-%d", i), 10*time.Second)
	}
	for i := range 3 {
		e.waitResult(fmt.Sprintf("b-%d", i), 10*time.Second)
	}
	// One batch per model: 8 jobs of a (MaxBatch), the 3 of b; none waited
	// the window (an hour), since nothing more was behind them.
	_, _, batches := w.Snapshot()
	got := map[string]int{}
	for _, b := range batches {
		t.Logf("batch %s of %d", b.Model, len(b.Jobs))
		got[b.Model] += 100 + len(b.Jobs)
	}
	if len(batches) != 2 || got["a"] != 108 || got["b"] != 103 {
		t.Fatalf("want 2 batches (a×8, b×3), got %v", got)
	}
}

// TestLoneJobLeavesAtOnce: one job on an idle fleet is pulled when its
// wake-up comes, not at the next poll (an hour here), and offered at once,
// not after the batch window (an hour too): nothing is behind it to fill a
// batch.
func TestLoneJobLeavesAtOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	// One heartbeat only: heartbeats wake the puller too.
	w := e.startWorkerWith("w1", 8, []string{"m"}, nil, fakeWorkerOptions{HeartbeatEvery: time.Hour, Quiet: true})
	cfg := testConfig("d1", e.connect("d1"))
	cfg.MaxWait = time.Hour
	cfg.WorkerTTL = time.Hour
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	d.pollEvery = time.Hour
	runNew(t, d)
	for i := range 3 { // one after another, each alone
		id := fmt.Sprintf("lone-%d", i)
		if r := e.waitResultAfter(newJob(id, "m", "normal"), 10*time.Second); r.Status != schemas.StatusCompleted {
			t.Fatalf("%s: %+v", id, r)
		}
	}
	if _, _, batches := w.Snapshot(); len(batches) != 3 {
		t.Fatalf("%d batches, want 3 of one job", len(batches))
	}
}

func TestBatchNeverAboveFreeSlots(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 3, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{TokenGap: 5 * time.Millisecond} })
	_, _ = runDispatcher(t, testConfig("d1", e.connect("d1")))
	for i := range 20 {
		e.mustSubmit(newJob(fmt.Sprintf("j-%d", i), "m", "normal"))
	}
	for i := range 20 {
		e.waitResult(fmt.Sprintf("j-%d", i), 20*time.Second)
	}
	checkNeverOverfilled(t, w, 3, 20)
}

// TestPriorityOrderNoStarvation: one slot, all three priorities backlogged. High
// goes first, FIFO holds within a priority, and low still runs long before the
// high backlog is gone.
func TestPriorityOrderNoStarvation(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	cfg := testConfig("d1", e.connect("d1"))
	cfg.MaxBatch = 1
	var running <-chan struct{}
	cfg.Logger, running = logSignal(logRunning)
	d, _ := runDispatcher(t, cfg)
	const n = 20
	for _, p := range []string{"low", "normal", "high"} {
		for i := range n {
			e.mustSubmit(newJob(fmt.Sprintf("%s-%02d", p, i), "m", p))
		}
	}
	// No worker yet: nothing may be pulled. The pull loop fetches only while
	// credit is positive, so credit — asked of the running dispatcher, not
	// after a sleep — is what says so.
	waitClosed(t, running, 10*time.Second, "dispatcher running")
	if c, pulled := d.credit(), d.Metrics().JobsPulled.Load(); c != 0 || pulled != 0 {
		t.Fatalf("credit %d, %d pulled without a worker", c, pulled)
	}
	if got := e.streamMsgs(subjects.StreamJobs); got != 3*n {
		t.Fatalf("pulled without capacity: JOBS has %d", got)
	}
	w := e.startWorker("w1", 1, []string{"m"}, nil)
	for _, p := range []string{"low", "normal", "high"} {
		for i := range n {
			e.waitResult(fmt.Sprintf("%s-%02d", p, i), 30*time.Second)
		}
	}
	_, order, _ := w.Snapshot()
	if len(order) != 3*n {
		t.Fatalf("%d assignments", len(order))
	}
	if !strings.HasPrefix(order[0], "high-") {
		t.Errorf("first job %s, want a high one", order[0])
	}
	last := map[string]string{}
	for _, id := range order {
		p := id[:strings.IndexByte(id, '-')]
		if id < last[p] {
			t.Errorf("FIFO broken within %s: %s after %s", p, id, last[p])
		}
		last[p] = id
	}
	var cnt = map[string]int{}
	firstLow := -1
	for i, id := range order[:21] {
		p := id[:strings.IndexByte(id, '-')]
		cnt[p]++
		if p == "low" && firstLow < 0 {
			firstLow = i
		}
	}
	if !(cnt["high"] > cnt["normal"] && cnt["normal"] > cnt["low"] && cnt["low"] >= 1) {
		t.Errorf("first 21 assignments by priority %v, want high > normal > low ≥ 1 (order %v)", cnt, order[:21])
	}
	if firstLow < 0 || firstLow > 14 {
		t.Errorf("low starved: first low at %d", firstLow)
	}
	t.Logf("first 21: %v; first low at %d", cnt, firstLow)
}

func TestTwoDispatchersNoDoubleRun(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w1 := e.startWorker("w1", 4, []string{"m"}, nil)
	w2 := e.startWorker("w2", 4, []string{"m"}, nil)
	d1, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	d2, _ := runDispatcher(t, testConfig("d2", e.connect("d2")))
	const n = 60
	for i := range n {
		e.mustSubmit(newJob(fmt.Sprintf("j-%02d", i), "m", schemas.Priorities[i%3]))
	}
	for i := range n {
		if r := e.waitResult(fmt.Sprintf("j-%02d", i), 30*time.Second); r.Status != schemas.StatusCompleted {
			t.Fatalf("status %s", r.Status)
		}
	}
	a1, _, _ := w1.Snapshot()
	a2, _, _ := w2.Snapshot()
	for i := range n {
		id := fmt.Sprintf("j-%02d", i)
		if a1[id]+a2[id] != 1 {
			t.Errorf("%s assigned %d times", id, a1[id]+a2[id])
		}
	}
	p1, p2 := d1.Metrics().JobsAssigned.Load(), d2.Metrics().JobsAssigned.Load()
	if p1+p2 != n {
		t.Errorf("dispatchers assigned %d + %d", p1, p2)
	}
	t.Logf("d1 assigned %d, d2 %d", p1, p2)
}

// TestRestartLosesNothing: a dispatcher dies (no drain) with jobs running and
// queued; a new one finishes every job. Only a dispatcher stores a record, so a
// job whose dispatcher died mid-run runs again (at most once more here) unless
// its record was adopted (adopt.go: the new dispatcher was up when it
// finished); the others run once, and every job has exactly one record.
func TestRestartLosesNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{TokenGap: 40 * time.Millisecond} })
	cfg := testConfig("d1", e.connect("d1"))
	cfg.AckWait = time.Second
	cfg.NoDrain = true
	cfg.MaxBatch = 1
	_, stopA := runDispatcher(t, cfg)
	const n = 8
	for i := range n {
		e.mustSubmit(newJob(fmt.Sprintf("j-%d", i), "m", "normal"))
	}
	waitFor(t, 10*time.Second, "two jobs running", func() bool { _, o, _ := w.Snapshot(); return len(o) >= 2 })
	_, runningWhenKilled, _ := w.Snapshot()
	stopA()
	// The running jobs finish on the worker while their dispatcher is gone:
	// their hand-over finds no responder; adopted by d2 if it is up by then,
	// else nothing is stored and they run again.
	cfgB := testConfig("d2", e.connect("d2"))
	cfgB.AckWait = time.Second
	_, _ = runDispatcher(t, cfgB)
	for i := range n {
		if r := e.waitResult(fmt.Sprintf("j-%d", i), 30*time.Second); r.Status != schemas.StatusCompleted {
			t.Fatalf("status %s", r.Status)
		}
	}
	waitFor(t, 10*time.Second, "JOBS empty", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })
	a, _, _ := w.Snapshot()
	for i := range n {
		id := fmt.Sprintf("j-%d", i)
		want := 1
		if slices.Contains(runningWhenKilled, id) {
			want = 2
		}
		if a[id] < 1 || a[id] > want {
			t.Errorf("%s assigned %d times, want 1 to %d", id, a[id], want)
		}
	}
}

func TestExpiredWithoutRunning(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	_, _ = runDispatcher(t, testConfig("d1", e.connect("d1")))
	past := time.Now().Add(-time.Second)
	soon := time.Now().Add(200 * time.Millisecond)
	j1, j2 := newJob("late", "m", "normal"), newJob("soon", "m", "high")
	j1.Deadline, j2.Deadline = &past, &soon
	c1 := e.listen(j1.ReplyTo)
	e.mustSubmit(j1)
	e.mustSubmit(j2)
	// j2's deadline passes while it waits in JOBS (no worker, no credit): the
	// condition is the clock itself, so wait for exactly that.
	waitFor(t, 5*time.Second, "j2's deadline to pass", func() bool { return time.Now().After(soon) })
	w := e.startWorker("w1", 2, []string{"m"}, nil)
	for _, id := range []string{"late", "soon"} {
		r := e.waitResult(id, 10*time.Second)
		if r.Status != schemas.StatusExpired || r.Error == nil || r.Error.Code != "deadline_exceeded" {
			t.Fatalf("%s: %+v", id, r)
		}
	}
	if r := c1.wait(t, 5*time.Second); r.Status != schemas.StatusExpired {
		t.Fatalf("caller got %s", r.Status)
	}
	if a, _, _ := w.Snapshot(); len(a) != 0 {
		t.Fatalf("expired jobs ran: %v", a)
	}
	waitFor(t, 5*time.Second, "acked", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })
}

func TestCancelQueued(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	prod, err := bus.NewClient(e.nc)
	if err != nil {
		t.Fatal(err)
	}
	// Cancelled while no dispatcher ran: recognised through CANCELS when pulled.
	early := newJob("early", "m", "normal")
	e.mustSubmit(early)
	if err := prod.Cancel(context.Background(), "early", "changed my mind"); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig("d1", e.connect("d1"))
	var running <-chan struct{}
	cfg.Logger, running = logSignal(logRunning)
	d, _ := runDispatcher(t, cfg)
	// Cancelled while waiting in JOBS (no worker, so never delivered). Only a
	// cancel stored after the dispatcher read the stored ones is acted on at
	// once; an earlier one is remembered until the job is delivered, which
	// with no worker is never, and the wait below would time out.
	inJobs := newJob("in-jobs", "m", "normal")
	c := e.listen(inJobs.ReplyTo)
	e.mustSubmit(inJobs)
	waitClosed(t, running, 10*time.Second, "dispatcher running")
	if err := prod.Cancel(context.Background(), "in-jobs", "stop"); err != nil {
		t.Fatal(err)
	}
	r := c.wait(t, 10*time.Second)
	if r.Status != schemas.StatusCancelled {
		t.Fatalf("in-jobs: %+v", r)
	}
	// The terminal event goes out after the record is stored and before the ack
	// (stored, then acked), so the ack may trail the event by a moment.
	waitFor(t, 5*time.Second, `only "early" left in JOBS`, func() bool { return e.streamMsgs(subjects.StreamJobs) == 1 })
	w := e.startWorker("w1", 2, []string{"m"}, nil)
	if r := e.waitResult("early", 10*time.Second); r.Status != schemas.StatusCancelled {
		t.Fatalf("early: %+v", r)
	}
	waitFor(t, 5*time.Second, "JOBS empty", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })
	if a, _, _ := w.Snapshot(); len(a) != 0 {
		t.Fatalf("cancelled jobs ran: %v", a)
	}
	if d.Metrics().Cancelled.Load() != 2 {
		t.Fatalf("Cancelled = %d", d.Metrics().Cancelled.Load())
	}
}

func TestCancelHeldNotDispatched(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	// The only worker serves another model: the job is pulled (there are free
	// slots) and held in memory, waiting for a worker that has its model.
	// The model was served recently (announced), so it is waited for; one
	// never announced would be dead-lettered at once.
	e.announce("m")
	w := e.startWorker("w1", 8, []string{"other"}, nil)
	cfg := testConfig("d1", e.connect("d1"))
	cfg.ModelWait = time.Hour
	d, _ := runDispatcher(t, cfg)
	held := newJob("held", "m", "normal")
	c := e.listen(held.ReplyTo)
	e.mustSubmit(held)
	waitFor(t, 5*time.Second, "held pulled", func() bool { return d.Metrics().JobsPulled.Load() == 1 })
	prod, _ := bus.NewClient(e.nc)
	if err := prod.Cancel(context.Background(), "held", ""); err != nil {
		t.Fatal(err)
	}
	if r := c.wait(t, 10*time.Second); r.Status != schemas.StatusCancelled || r.Attempt != 0 {
		t.Fatalf("held: %+v", r)
	}
	waitFor(t, 5*time.Second, "JOBS empty", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })
	if a, _, _ := w.Snapshot(); a["held"] != 0 {
		t.Fatalf("cancelled job ran")
	}
}

func TestInvalidAndAlreadyFinished(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, nil)
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	// Not JSON at all.
	if _, err := e.js.Publish(context.Background(), subjects.Job("", "normal", "bad"), []byte("{nope")); err != nil {
		t.Fatal(err)
	}
	if r := e.waitResult("bad", 10*time.Second); r.Status != schemas.StatusFailed || r.Error.Code != "invalid_request" {
		t.Fatalf("bad: %+v", r)
	}
	// An invalid job's failure is kept under its subject's tenant — the one the
	// server let publish it — whatever the body claims.
	for _, c := range []struct{ id, subjTenant, raw string }{
		{"bad-a", "a", `{"id":"bad-a","tenant":"a"}`},
		{"bad-t", "", `{"id":"bad-t","tenant":"Not.A.Tenant","model":"m","prompt":"x"}`},
	} {
		if _, err := e.js.Publish(context.Background(), subjects.Job(c.subjTenant, "normal", c.id), []byte(c.raw)); err != nil {
			t.Fatal(err)
		}
		if r := e.waitTenantResult(c.subjTenant, c.id, 10*time.Second); r.Status != schemas.StatusFailed || r.Error.Code != "invalid_request" || r.Tenant != c.subjTenant {
			t.Fatalf("%s: %+v", c.id, r)
		}
	}
	waitFor(t, 10*time.Second, "JOBS empty", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })
	if a, _, _ := w.Snapshot(); len(a) != 0 {
		t.Fatalf("ran %v", a)
	}
	_ = d
}

// A redelivered job whose record exists (it finished, then a crash lost the
// ack) is acked without running.
// Mutation caught: skipping the RESULTS check in check() for redeliveries.
func TestRedeliveredFinishedJobIsNotRun(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, nil)
	ctx := context.Background()
	done := &schemas.ResultMsg{Type: "result", JobID: "done", Attempt: 1, Status: schemas.StatusCompleted, FinishReason: "stop", Text: "x", FinishedAt: time.Now().UTC()}
	if err := results.Record(ctx, e.js, done); err != nil {
		t.Fatal(err)
	}
	e.mustSubmit(newJob("done", "m", "normal"))
	// A dispatcher that died took the first delivery: it goes back unacked.
	c, err := e.js.CreateOrUpdateConsumer(ctx, subjects.StreamJobs, jetstream.ConsumerConfig{
		Durable: ConsumerName("dispatch", "normal"), FilterSubject: subjects.JobsConsumerFilter("normal"), AckPolicy: jetstream.AckExplicitPolicy, MaxDeliver: -1})
	if err != nil {
		t.Fatal(err)
	}
	batch, err := c.FetchNoWait(1)
	if err != nil {
		t.Fatal(err)
	}
	for m := range batch.Messages() {
		if err := m.Nak(); err != nil {
			t.Fatal(err)
		}
	}
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	waitFor(t, 10*time.Second, "JOBS empty", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })
	if d.Metrics().AlreadyFinished.Load() != 1 {
		t.Fatalf("AlreadyFinished %d", d.Metrics().AlreadyFinished.Load())
	}
	if a, _, _ := w.Snapshot(); len(a) != 0 {
		t.Fatalf("ran %v", a)
	}
}

// TestQueueFullNoLoss: the worker is saturated, so nothing more is pulled and
// JOBS fills up to its limit; the producer gets ErrQueueFull; every accepted
// job completes once the worker frees up.
func TestQueueFullNoLoss(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{JobsMaxMsgs: 5})
	w := e.startWorker("w1", 1, []string{"m"}, func(aj schemas.AssignedJob) jobPlan { return jobPlan{Block: true} })
	cfg := testConfig("d1", e.connect("d1"))
	cfg.MaxBatch = 1
	_, _ = runDispatcher(t, cfg)
	prod, _ := bus.NewClient(e.nc)
	var accepted []string
	var full error
	for i := range 30 {
		j := newJob(fmt.Sprintf("q-%02d", i), "m", "normal")
		_, err := prod.Submit(context.Background(), j)
		if errors.Is(err, bus.ErrQueueFull) {
			full = err
			break
		}
		if err != nil {
			t.Fatalf("submit: %v", err)
		}
		accepted = append(accepted, j.ID)
		if i == 0 {
			waitFor(t, 5*time.Second, "first job running", func() bool { a, _, _ := w.Snapshot(); return len(a) == 1 })
		}
	}
	if full == nil {
		t.Fatalf("30 jobs accepted with a 5-message queue and a saturated worker")
	}
	// A saturated worker means no pull: the running job (unacked, so still in
	// JOBS) plus 4 waiting fill the 5-message limit.
	if len(accepted) != 5 {
		t.Errorf("accepted %d jobs before queue full, want 5", len(accepted))
	}
	w.Release()
	for _, id := range accepted {
		if r := e.waitResult(id, 20*time.Second); r.Status != schemas.StatusCompleted {
			t.Fatalf("%s: %s", id, r.Status)
		}
	}
	a, _, _ := w.Snapshot()
	for _, id := range accepted {
		if a[id] != 1 {
			t.Errorf("%s ran %d times", id, a[id])
		}
	}
}
