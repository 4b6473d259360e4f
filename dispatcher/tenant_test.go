package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A job's tenant is its subject's. A body that claims another tenant, or a
// reply_to in another tenant's namespace, ends failed under the subject's
// tenant without running, nothing is written under the claimed tenant, and no
// event is sent to the foreign reply subject.
// Mutation caught: dropping the tenant case or the reply_to case in
// Dispatcher.decode (each alone; claims-b used to be refused by the reply_to
// case too, so dropping the tenant case went unnoticed).
func TestJobsBoundToTheirSubjectsTenant(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, nil)
	runDispatcher(t, testConfig("d1", e.connect("d1")))

	foreign := make(chan *nats.Msg, 8)
	sub, err := e.nc.ChanSubscribe(subjects.ReplyNamespace("b"), foreign)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()

	claimsB := newJob("claims-b", "m", "normal")
	// Replies into a's namespace, so only the tenant case can refuse it.
	claimsB.Tenant, claimsB.ReplyTo = "b", bus.ReplySubject("a", "claims-b")
	repliesToB := newJob("replies-to-b", "m", "normal")
	repliesToB.Tenant, repliesToB.ReplyTo = "a", bus.ReplySubject("b", "replies-to-b")
	for _, j := range []*schemas.JobRequest{claimsB, repliesToB} {
		data, _ := json.Marshal(j)
		if _, err := e.js.Publish(context.Background(), subjects.Job("a", "normal", j.ID), data); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"claims-b", "replies-to-b"} {
		r := e.waitTenantResult("a", id, 10*time.Second)
		if r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != "invalid_request" || r.Tenant != "a" {
			t.Fatalf("%s: %+v", id, r)
		}
		if _, err := e.tenantResult("b", id); !errors.Is(err, bus.ErrNoResult) {
			t.Fatalf("%s has a record under the claimed tenant b: %v", id, err)
		}
	}
	if a, _, _ := w.Snapshot(); len(a) != 0 {
		t.Fatalf("jobs of a forged tenant ran: %v", a)
	}
	// Both records are stored, and the terminal event would have been sent
	// before them; a round trip makes sure nothing is still on its way.
	if err := e.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	if len(foreign) != 0 {
		m := <-foreign
		t.Fatalf("an event reached tenant b's reply namespace: %s %s", m.Subject, m.Data)
	}
}

// A message on JOBS from which no job can be derived is dead-lettered raw with
// its subject and terminated, once: JOBS ends empty, the dispatcher does not
// loop on it, and a subject the stream does not store is refused by the server.
// Mutation caught: returning from check without notAJob (the message would be
// redelivered for ever and JOBS never empty).
func TestMessagesThatAreNoJobEnd(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w1", 2, []string{"m"}, nil)
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	ctx := context.Background()
	notJobs := []string{"mlx.jobs.a.normal.*", "mlx.jobs.a.normal.>", "mlx.jobs.*.normal.x", "mlx.jobs.Bad.normal.x", "mlx.jobs.a.high.a%b"}
	for _, subj := range notJobs {
		if _, err := e.js.Publish(ctx, subj, []byte(`{"id":"x"}`)); err != nil {
			t.Fatalf("publish %s: %v", subj, err)
		}
	}
	for _, subj := range []string{"mlx.jobs.normal.x", "mlx.jobs.a.bogus.x", "mlx.jobs.a.normal.x.extra"} {
		if _, err := e.js.Publish(ctx, subj, []byte(`{}`)); !errors.Is(err, jetstream.ErrNoStreamResponse) && !errors.Is(err, nats.ErrNoResponders) {
			t.Errorf("publish on %s: err = %v, want the server to refuse it (no stream)", subj, err)
		}
	}
	waitFor(t, 10*time.Second, "JOBS empty", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })
	want := uint64(len(notJobs))
	waitFor(t, 10*time.Second, "a raw dead letter each", func() bool { return e.streamMsgs(subjects.StreamDLQ) == want })
	if n := d.Metrics().NotAJob.Load(); n != int64(want) {
		t.Fatalf("NotAJob = %d, want %d", n, want)
	}
	s, err := e.js.Stream(ctx, subjects.StreamDLQ)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := s.GetMsg(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	var rec schemas.DLQRecordMsg
	if err := json.Unmarshal(raw.Data, &rec); err != nil || rec.RawSubject == "" || rec.Reason != "not_a_job" || rec.Job.ID != "" {
		t.Fatalf("raw dead letter %+v (%v)", rec, err)
	}
	if err := schemas.Validate(schemas.DLQRecord, raw.Data); err != nil {
		t.Fatalf("raw dead letter breaks its schema: %v", err)
	}
	// Delivered once each: terminated, not redelivered.
	if n := d.Metrics().JobsPulled.Load(); n != int64(want) {
		t.Fatalf("pulled %d deliveries, want %d", n, want)
	}
}

// A terminal record or attempt report from a worker that does not run that
// attempt is refused: the job is neither ended nor retried by it, and goes on
// to its real end. A worker credential can therefore not end another's job.
// Mutation caught: dropping the j.workerID != wid check in onDone.
func TestRecordsFromOtherWorkersRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Block: true} })
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	j := newJob("victim", "m", "normal")
	c := e.listen(j.ReplyTo)
	e.mustSubmit(j)
	waitFor(t, 10*time.Second, "victim assigned", func() bool { a, _, _ := w.Snapshot(); return a["victim"] == 1 })

	forged := schemas.ResultMsg{Type: "result", JobID: "victim", Attempt: 1, Status: schemas.StatusCompleted, FinishReason: "stop",
		Text: "forged", Model: "m", WorkerID: "w1", FinishedAt: time.Now().UTC()}
	data, _ := json.Marshal(forged)
	m, err := e.nc.Request(subjects.Done("evil", "d1"), data, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var reply schemas.FinishReplyMsg
	if err := json.Unmarshal(m.Data, &reply); err != nil || reply.Status != schemas.FinishUnknown {
		t.Fatalf("forged hand-over answered %s (%v), want unknown", m.Data, err)
	}
	rep, _ := json.Marshal(schemas.AttemptReportMsg{JobID: "victim", Attempt: 1, WorkerID: "w1",
		Error: schemas.ErrorInfo{Code: "runtime_crashed", Message: "forged", Retryable: true}, ReportedAt: time.Now().UTC()})
	if err := e.nc.PublishRequest(subjects.Attempt("evil"), e.nc.NewInbox(), rep); err != nil { // with a reply subject, as a worker sends it (subjects.Sent)
		t.Fatal(err)
	}
	// The forged report, if heard, would retry the job at once.
	if err := e.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "forgeries counted", func() bool { return d.Metrics().ForgedRecords.Load() == 2 })
	if _, err := e.result("victim"); !errors.Is(err, bus.ErrNoResult) {
		t.Fatalf("forged record was stored: %v", err)
	}
	w.Release()
	r := c.wait(t, 10*time.Second)
	if r.Status != schemas.StatusCompleted || r.Text != fullText(5) || r.WorkerID != "w1" || d.Metrics().Retries.Load() != 0 {
		t.Fatalf("terminal %+v, retries %d", r, d.Metrics().Retries.Load())
	}
}

// A worker's late record of an attempt the job has moved on from (the worker
// was paused past its TTL, say, and the job retried) is refused as before but
// counted as superseded, not forged: the forged count is the alarm for
// misbehaving credentials, and an honest paused worker set it off (operator
// round 2, F3). A record naming the current attempt from another worker is
// still forged.
// Mutation caught: dispatcher/terminal.go onDone without its superseded
// branch (the late record counts forged).
func TestLateRecordOfASupersededAttemptIsNotForged(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, func(aj schemas.AssignedJob) jobPlan {
		if aj.Attempt == 1 {
			return jobPlan{Crash: 1}
		}
		return jobPlan{Block: true}
	})
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	j := newJob("late", "m", "normal")
	e.mustSubmit(j)
	waitFor(t, 10*time.Second, "attempt 2 running", func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		h := d.jobs[subjects.JobRef{ID: j.ID}.Key()]
		return h != nil && h.attempt == 2 && h.state == StateRunning
	})
	handOver := func(worker string, attempt int) schemas.FinishReplyMsg {
		rec := schemas.ResultMsg{Type: "result", JobID: j.ID, Attempt: attempt, Status: schemas.StatusCompleted, FinishReason: "stop",
			Text: "late", Model: "m", WorkerID: worker, FinishedAt: time.Now().UTC()}
		data, _ := json.Marshal(rec)
		m, err := e.nc.Request(subjects.Done(worker, "d1"), data, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var reply schemas.FinishReplyMsg
		if err := json.Unmarshal(m.Data, &reply); err != nil {
			t.Fatal(err)
		}
		return reply
	}
	if r := handOver("w1", 1); r.Status != schemas.FinishUnknown {
		t.Fatalf("late record of attempt 1 answered %s, want unknown", r.Status)
	}
	if f, s := d.Metrics().ForgedRecords.Load(), d.Metrics().SupersededRecords.Load(); f != 0 || s != 1 {
		t.Fatalf("late record: forged %d, superseded %d; want 0 and 1", f, s)
	}
	if r := handOver("w9", 2); r.Status != schemas.FinishUnknown {
		t.Fatalf("another worker's record of attempt 2 answered %s, want unknown", r.Status)
	}
	if f := d.Metrics().ForgedRecords.Load(); f != 1 {
		t.Fatalf("another worker's record of the current attempt: forged %d, want 1", f)
	}
	if _, err := e.result(j.ID); !errors.Is(err, bus.ErrNoResult) {
		t.Fatalf("a refused record was stored: %v", err)
	}
	w.Release()
	if r := e.waitResult(j.ID, 10*time.Second); r.Status != schemas.StatusCompleted || r.Attempt != 2 {
		t.Fatalf("the job ended %s at attempt %d, want completed at 2", r.Status, r.Attempt)
	}
}

// Even a hand-over that is no record is answered: under auth it crossed into
// the dispatchers' account through a service import, and the server keeps an
// entry for each request until it is answered or two minutes pass (red team
// round 13, F1).
// Mutation caught: dispatcher/terminal.go onDone without the answer on its
// decode failure (the request times out).
func TestGarbageHandOverIsAnswered(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	runDispatcher(t, testConfig("d1", e.connect("d1")))
	// Asked until the dispatcher has subscribed (a request before that has
	// no responder).
	var m *nats.Msg
	var err error
	waitFor(t, 10*time.Second, "an answer to a garbage hand-over", func() bool {
		m, err = e.nc.Request(subjects.Done("w1", "d1"), []byte("not a record"), 500*time.Millisecond)
		return err == nil
	})
	var reply schemas.FinishReplyMsg
	if err := json.Unmarshal(m.Data, &reply); err != nil || reply.Status != schemas.FinishUnknown {
		t.Fatalf("answered %s (%v), want unknown", m.Data, err)
	}
}
