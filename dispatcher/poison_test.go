package dispatcher

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A producer stores jobs that look like the server's status messages (no
// body, "Status: 404 / No Messages" or "409 / Consumer Deleted") ahead of
// another tenant's job at the same priority. Each is a message on JOBS like
// any other: it ends failed invalid_request, and the job behind it runs.
// nats.go's Fetch took them for the server's own status and ended each pull
// there, never acking them; the jobs behind came back only after the ack
// wait, again behind them, for ever (red team round 17, tenant F1).
// Mutation caught: fetch through the consumer's FetchNoWait again (b's job
// never runs).
func TestStatusLookalikeJobsDoNotStallThePull(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w1", 4, []string{"m"}, nil)
	for i, st := range [][2]string{{"404", "No Messages"}, {"409", "Consumer Deleted"}, {"408", "Request Timeout"}} {
		m := nats.NewMsg(subjects.Job("a", "normal", "poison"+string(rune('0'+i))))
		m.Header.Set("Status", st[0])
		m.Header.Set("Description", st[1])
		if _, err := e.js.PublishMsg(t.Context(), m); err != nil {
			t.Fatal(err)
		}
	}
	b := newJob("behind", "m", "normal")
	b.Tenant, b.ReplyTo = "b", bus.ReplySubject("b", "behind")
	e.mustSubmit(b)
	_, _ = runDispatcher(t, testConfig("d1", e.connect("d1")))
	if r := e.waitTenantResult("b", "behind", 10*time.Second); r.Status != schemas.StatusCompleted || r.Attempt != 1 {
		t.Fatalf("b's job behind the lookalikes: %s at attempt %d (%+v)", r.Status, r.Attempt, r.Error)
	}
	for i := range 3 {
		id := "poison" + string(rune('0'+i))
		if r := e.waitTenantResult("a", id, 10*time.Second); r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != schemas.CodeInvalidRequest {
			t.Errorf("lookalike %s: %s (%+v), want failed invalid_request", id, r.Status, r.Error)
		}
	}
	waitFor(t, 10*time.Second, "JOBS empty", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })
}

// A stored cancel that looks like the server's "consumer deleted" (no body,
// "Status: 409, Description: Consumer Deleted") is a cancel like any other,
// and no valid one: the dispatcher reads past it, starts (no job is pulled
// before the stored cancels are read), and acts on the cancels that follow
// (forwards a running job's to its worker).
// nats.go's ordered consumer made a new consumer at it, was handed it again,
// and so on for ever: every cancel ignored, and after a restart no job of any
// tenant pulled (red team round 17, tenant F2).
// Mutation caught: watchCancels on the ordered consumer again (the dispatcher
// never starts; the job is never placed).
func TestStatusLookalikeCancelIsReadPast(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	for _, st := range [][2]string{{"409", "Consumer Deleted"}, {"404", "No Messages"}, {"408", "Request Timeout"}} {
		m := nats.NewMsg(subjects.Cancel("a", "pc"+st[0]))
		m.Header.Set("Status", st[0])
		m.Header.Set("Description", st[1])
		if _, err := e.js.PublishMsg(t.Context(), m); err != nil {
			t.Fatal(err)
		}
	}
	w := e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Block: true} })
	defer w.Release()
	forwarded := e.cancelsTo("w1")
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	e.mustSubmit(newJob("victim", "m", "normal"))
	waitOnWorker(t, d, subjects.JobRef{ID: "victim"}.Key())
	data, _ := json.Marshal(schemas.CancelMsg{JobID: "victim", RequestedAt: time.Now().UTC()})
	if _, err := e.js.Publish(t.Context(), subjects.Cancel("", "victim"), data); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-forwarded:
		var c schemas.CancelMsg
		if err := json.Unmarshal(m.Data, &c); err != nil || c.JobID != "victim" {
			t.Fatalf("forwarded %s (%v), want the victim's cancel", m.Data, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the cancel after the lookalikes was not acted on (not forwarded to the job's worker)")
	}
	if n := d.Metrics().BadCancels.Load(); n != 3 {
		t.Errorf("bad cancels %d, want the 3 lookalikes", n)
	}
}

// The cancels' consumer deleted under the dispatcher (an operator, a server
// restart losing it) is made again from the cancel after the last one
// handled: a cancel stored after it is acted on, once.
// Mutation caught: the follower's loop without making its consumer again
// (the cancel is never forwarded).
func TestCancelFollowerOutlivesItsConsumer(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Block: true} })
	defer w.Release()
	forwarded := e.cancelsTo("w1")
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	e.mustSubmit(newJob("later", "m", "normal"))
	waitOnWorker(t, d, subjects.JobRef{ID: "later"}.Key())
	s, err := e.js.Stream(t.Context(), subjects.StreamCancels)
	if err != nil {
		t.Fatal(err)
	}
	names := s.ConsumerNames(t.Context())
	n := 0
	for name := range names.Name() {
		if err := s.DeleteConsumer(t.Context(), name); err != nil {
			t.Fatal(err)
		}
		n++
	}
	if n != 1 {
		t.Fatalf("%d consumers on CANCELS, want the dispatcher's one", n)
	}
	data, _ := json.Marshal(schemas.CancelMsg{JobID: "later", RequestedAt: time.Now().UTC()})
	if _, err := e.js.Publish(t.Context(), subjects.Cancel("", "later"), data); err != nil {
		t.Fatal(err)
	}
	select {
	case <-forwarded:
	case <-time.After(20 * time.Second):
		t.Fatal("a cancel stored after the consumer was deleted was not acted on")
	}
	select {
	case m := <-forwarded:
		t.Fatalf("the cancel was acted on twice: %s", m.Data)
	default:
	}
}

// waitOnWorker waits until d holds the job of key on a worker.
func waitOnWorker(t *testing.T, d *Dispatcher, key string) {
	t.Helper()
	waitFor(t, 10*time.Second, "the job on a worker", func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		j := d.jobs[key]
		return j != nil && (j.state == StateRunning || j.state == StateDispatched)
	})
}

// The dispatcher follows RESULTS from the sequence after the last record
// stored when it started, not with DeliverNew: an ordered consumer that has
// delivered nothing makes itself again with its first policy, and DeliverNew
// then skipped every record stored meanwhile — the records another dispatcher
// adopted for this one's jobs while its connection was cut, so it held them
// until attempt_timeout and ran them again (red team round 17, second pass,
// F2).
// Mutation caught: watchResults with DeliverNewPolicy again.
func TestResultsAreFollowedFromASequence(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	res, _ := json.Marshal(schemas.ResultMsg{Type: "result", JobID: "before", Attempt: 1, Status: schemas.StatusCompleted,
		FinishReason: schemas.FinishStop, Model: "m", WorkerID: "w1", FinishedAt: time.Now().UTC()})
	if _, err := e.js.Publish(t.Context(), subjects.Result("", "before"), res); err != nil {
		t.Fatal(err)
	}
	var running <-chan struct{}
	cfg := testConfig("d1", e.connect("d1"))
	cfg.Logger, running = logSignal(logRunning)
	_, _ = runDispatcher(t, cfg)
	waitClosed(t, running, 10*time.Second, "dispatcher running")
	s, err := e.js.Stream(t.Context(), subjects.StreamResults)
	if err != nil {
		t.Fatal(err)
	}
	lister := s.ListConsumers(t.Context())
	n := 0
	for ci := range lister.Info() {
		n++
		if ci.Config.DeliverPolicy != jetstream.DeliverByStartSequencePolicy || ci.Config.OptStartSeq != 2 {
			t.Errorf("RESULTS followed with %v from %d, want by start sequence from 2 (after the one record)", ci.Config.DeliverPolicy, ci.Config.OptStartSeq)
		}
	}
	if n != 1 {
		t.Fatalf("%d consumers on RESULTS, want the dispatcher's one", n)
	}
}

// The JOBS consumers deleted under a running dispatcher are made again, and
// jobs submitted after run: before, every pull was answered 503 and no job of
// the priority was taken until a restart (red team round 17, second pass,
// F4).
// Mutation caught: fetch without making the consumer again.
func TestJobsConsumerDeletedIsMadeAgain(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w1", 2, []string{"m"}, nil)
	var running <-chan struct{}
	cfg := testConfig("d1", e.connect("d1"))
	cfg.Logger, running = logSignal(logRunning)
	_, _ = runDispatcher(t, cfg)
	waitClosed(t, running, 10*time.Second, "dispatcher running")
	for _, p := range schemas.Priorities {
		if err := e.js.DeleteConsumer(t.Context(), subjects.StreamJobs, ConsumerName("dispatch", p)); err != nil {
			t.Fatal(err)
		}
	}
	if r := e.waitResultAfter(newJob("after-delete", "m", "normal"), 15*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("a job submitted after its consumer was deleted: %s (%+v)", r.Status, r.Error)
	}
}
