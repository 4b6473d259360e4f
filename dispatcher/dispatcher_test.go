package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/breaker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go"
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
	_, _ = runDispatcher(t, cfg)
	const n = 20
	for _, p := range []string{"low", "normal", "high"} {
		for i := range n {
			e.mustSubmit(newJob(fmt.Sprintf("%s-%02d", p, i), "m", p))
		}
	}
	// No worker yet: nothing may be pulled.
	time.Sleep(150 * time.Millisecond)
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
// job whose dispatcher died mid-run runs again (at most once more here); the
// others run once, and every job has exactly one record.
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
	// The running jobs finish on the worker while no dispatcher runs: their
	// hand-over finds no responder, nothing is stored, and they run again.
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
		if a[id] != want {
			t.Errorf("%s assigned %d times, want %d", id, a[id], want)
		}
	}
}

// TestWorkerLostMidStreamMigrates: the worker dies silently after 3 tokens; the
// job resumes on another worker with exactly the text already sent.
// Mutation caught: dispatcher/batcher.go launch, drop `aj.Resume = &r`.
func TestWorkerLostMidStreamMigrates(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w1 := e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Die: 3} })
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	j := newJob("mig", "m", "normal")
	j.MaxTokens = 10
	c := e.listen(j.ReplyTo)
	e.mustSubmit(j)
	waitFor(t, 10*time.Second, "worker 1 dead", w1.Dead)
	w2 := e.startWorker("w2", 2, []string{"m"}, nil)
	r := c.wait(t, 15*time.Second)
	if r.Status != schemas.StatusCompleted {
		t.Fatalf("status %s %+v", r.Status, r.Error)
	}
	want := fullText(10)
	if got := c.text(); got != want || r.Text != want {
		t.Fatalf("caller saw %q, result %q, want %q", got, r.Text, want)
	}
	_, _, batches := w2.Snapshot()
	if len(batches) != 1 || len(batches[0].Jobs) != 1 {
		t.Fatalf("w2 batches %v", batches)
	}
	aj := batches[0].Jobs[0]
	if aj.Attempt != 2 || aj.Resume == nil || aj.Resume.Text != fullText(3) || aj.Resume.CompletionTokens != 3 {
		t.Fatalf("second attempt %d resume %+v", aj.Attempt, aj.Resume)
	}
	if d.Metrics().WorkersLost.Load() != 1 || d.Metrics().Retries.Load() != 1 {
		t.Fatalf("lost %d retries %d", d.Metrics().WorkersLost.Load(), d.Metrics().Retries.Load())
	}
}

func TestDeadLetterAfterMaxAttempts(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Crash: 1} })
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	j := newJob("doomed", "m", "normal")
	c := e.listen(j.ReplyTo)
	e.mustSubmit(j)
	r := c.wait(t, 15*time.Second)
	if r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != "attempts_exhausted" || !strings.Contains(r.Error.Message, "runtime_crashed") {
		t.Fatalf("terminal %+v err %+v", r, r.Error)
	}
	if got, want := c.text(), fullText(3); got != want || r.Text != want {
		t.Fatalf("text %q / %q, want %q", got, r.Text, want)
	}
	s, _ := e.js.Stream(context.Background(), subjects.StreamDLQ)
	raw, err := s.GetLastMsgForSubject(context.Background(), subjects.DLQ("", "doomed"))
	if err != nil {
		t.Fatalf("DLQ: %v", err)
	}
	var rec schemas.DLQRecordMsg
	_ = json.Unmarshal(raw.Data, &rec)
	if rec.Attempts != 3 || rec.LastError.Code != "runtime_crashed" || rec.Job.ID != "doomed" || rec.DispatcherID != "d1" {
		t.Fatalf("dlq record %+v", rec)
	}
	_, _, batches := w.Snapshot()
	if len(batches) != 3 {
		t.Fatalf("%d attempts ran", len(batches))
	}
	for i, b := range batches {
		if b.Jobs[0].Attempt != i+1 {
			t.Errorf("attempt %d numbered %d", i+1, b.Jobs[0].Attempt)
		}
		if i > 0 && (b.Jobs[0].Resume == nil || b.Jobs[0].Resume.Text != fullText(i)) {
			t.Errorf("attempt %d resume %+v", i+1, b.Jobs[0].Resume)
		}
	}
	waitFor(t, 5*time.Second, "acked", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })
	if d.Metrics().DeadLettered.Load() != 1 {
		t.Fatalf("DeadLettered %d", d.Metrics().DeadLettered.Load())
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
	time.Sleep(400 * time.Millisecond) // j2's deadline passes while it waits in JOBS (no worker)
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
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	// Cancelled while waiting in JOBS (no worker, so never delivered).
	inJobs := newJob("in-jobs", "m", "normal")
	c := e.listen(inJobs.ReplyTo)
	e.mustSubmit(inJobs)
	time.Sleep(50 * time.Millisecond)
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

// TestBreakerStopsRoutingToFailingWorker: a worker that never answers
// assignments is cut off after the threshold while a healthy one takes the work.
func TestBreakerStopsRoutingToFailingWorker(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	// "mute" heart-beats as ready with free slots but its assignments time out.
	mute := e.startWorker("mute", 8, []string{"m"}, nil)
	mute.Mute()
	var mu sync.Mutex
	muteHits := 0
	sub, _ := mute.Conn().Subscribe(subjects.Assign("mute"), func(m *nats.Msg) { mu.Lock(); muteHits++; mu.Unlock() })
	defer sub.Unsubscribe()
	_ = mute.Conn().Flush()
	cfg := testConfig("d1", e.connect("d1"))
	cfg.AssignTimeout = 100 * time.Millisecond
	cfg.MaxAttempts = 10
	cfg.BreakerThreshold = 2
	cfg.BreakerCooldown = time.Hour
	cfg.MaxBatch = 1
	d, _ := runDispatcher(t, cfg)
	for i := range 6 {
		e.mustSubmit(newJob(fmt.Sprintf("b-%d", i), "m", "normal"))
	}
	waitFor(t, 10*time.Second, "breaker open", func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		w := d.workers["mute"]
		return w != nil && w.br.State() == breaker.Open
	})
	mu.Lock()
	atOpen := muteHits
	mu.Unlock()
	good := e.startWorker("good", 2, []string{"m"}, nil)
	for i := range 6 {
		if r := e.waitResult(fmt.Sprintf("b-%d", i), 20*time.Second); r.Status != schemas.StatusCompleted {
			t.Fatalf("status %s", r.Status)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if muteHits != atOpen {
		t.Errorf("mute worker got %d assignments after its breaker opened", muteHits-atOpen)
	}
	if a, _, _ := good.Snapshot(); len(a) != 6 {
		t.Errorf("good worker ran %d", len(a))
	}
}

// A job for a model no live worker serves is dead-lettered (replayable once one
// does) after ModelWait — but only while workers are up: with none, it waits.
func TestUnservedModelIsDeadLettered(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	cfg := testConfig("d1", e.connect("d1"))
	cfg.ModelWait = 200 * time.Millisecond
	d, _ := runDispatcher(t, cfg)
	j := newJob("orphan", "nobody-has-it", "normal")
	c := e.listen(j.ReplyTo)
	e.mustSubmit(j)
	// No worker at all: an outage, the job waits.
	time.Sleep(3 * cfg.ModelWait)
	if _, err := e.result("orphan"); err == nil {
		t.Fatal("job failed while no worker was up; it should wait")
	}
	e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{} })
	r := c.wait(t, 10*time.Second)
	if r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != "model_not_available" || r.Attempt != 0 {
		t.Fatalf("terminal %+v err %+v", r, r.Error)
	}
	s, _ := e.js.Stream(context.Background(), subjects.StreamDLQ)
	raw, err := s.GetLastMsgForSubject(context.Background(), subjects.DLQ("", "orphan"))
	if err != nil {
		t.Fatalf("DLQ: %v", err)
	}
	var rec schemas.DLQRecordMsg
	_ = json.Unmarshal(raw.Data, &rec)
	if rec.Reason != "model_not_available" || rec.Job.Model != "nobody-has-it" {
		t.Fatalf("dlq record %+v", rec)
	}
	if n := d.Metrics().TransitionCount(StateQueued, EvDeadLetter); n != 1 {
		t.Fatalf("queued→dead_lettered counted %d", n)
	}
}

// A replayed job numbers its attempts after the ones it used before, and gets
// MaxAttempts afresh.
func TestReplayedJobContinuesAttemptNumbers(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{} })
	runDispatcher(t, testConfig("d1", e.connect("d1")))
	j := newJob("again", "m", "normal")
	j.Metadata = map[string]string{AttemptBaseKey: "3"}
	c := e.listen(j.ReplyTo)
	e.mustSubmit(j)
	r := c.wait(t, 10*time.Second)
	if r.Status != schemas.StatusCompleted || r.Attempt != 4 {
		t.Fatalf("terminal %+v", r)
	}
	_, _, batches := w.Snapshot()
	if len(batches) != 1 || batches[0].Jobs[0].Attempt != 4 {
		t.Fatalf("batches %+v", batches)
	}
}
