package dispatcher

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/breaker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A worker that accepts a job without a deadline and never ends it (hung
// agent, or a worker credential used to black-hole work: the red team's N2)
// holds it no longer than AttemptTimeout plus DeadlineGrace: the dispatcher
// tells the worker to stop that attempt for a retry (the message names it),
// waits the grace for its report, and runs the job again; it ends with one
// record. Here the same worker completes the second attempt.
// Mutation caught: dropping the timeout branch of tick (the job waits on the
// hung attempt for ever; the test times out).
func TestAttemptTimeoutRetriesAJobItsWorkerHolds(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w1", 2, []string{"m"}, func(aj schemas.AssignedJob) jobPlan {
		if aj.Attempt == 1 {
			return jobPlan{Hang: true}
		}
		return jobPlan{}
	})
	cancels := e.cancelsTo("w1")
	cfg := testConfig("d1", e.connect("d1"))
	cfg.AttemptTimeout = 300 * time.Millisecond
	cfg.DeadlineGrace = 200 * time.Millisecond // how long the worker gets to report the attempt
	d, stop := runDispatcher(t, cfg)
	defer stop()

	j := newJob("held", "m", schemas.PriorityNormal) // no deadline
	start := time.Now()
	res := e.waitResultAfter(j, 15*time.Second)
	if res.Status != schemas.StatusCompleted || res.Attempt != 2 || res.WorkerID != "w1" {
		t.Fatalf("record %s attempt %d on %q, want completed by attempt 2 on w1", res.Status, res.Attempt, res.WorkerID)
	}
	if took := res.FinishedAt.Sub(start); took < cfg.AttemptTimeout {
		t.Fatalf("ended %s after the submit, before the attempt timeout (%s) could have passed", took, cfg.AttemptTimeout)
	}
	select {
	case m := <-cancels:
		var c schemas.CancelMsg
		if err := json.Unmarshal(m.Data, &c); err != nil || c.JobID != "held" || c.Attempt != 1 || !c.Retry {
			t.Fatalf("cancel %s, want a retry stop for attempt 1 of held", m.Data)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the worker was not told to stop the timed-out attempt")
	}
	if n := d.Metrics().AttemptTimeouts.Load(); n != 1 {
		t.Fatalf("attempt timeouts counted %d, want 1", n)
	}
	if n := e.streamMsgs("RESULTS"); n != 1 {
		t.Fatalf("RESULTS holds %d records, want 1", n)
	}
}

// Out of attempts, a job whose every attempt times out ends failed with
// attempts_exhausted naming the timeout, once: a black-holed job without a
// deadline still ends.
func TestAttemptTimeoutExhaustsAttempts(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Hang: true} })
	cfg := testConfig("d1", e.connect("d1"))
	cfg.AttemptTimeout = 200 * time.Millisecond
	cfg.DeadlineGrace = 100 * time.Millisecond
	cfg.MaxAttempts = 2
	cfg.BreakerThreshold = 10 // the breaker is not what this test is about
	_, stop := runDispatcher(t, cfg)
	defer stop()

	res := e.waitResultAfter(newJob("black-holed", "m", schemas.PriorityNormal), 20*time.Second)
	if res.Status != schemas.StatusFailed || res.Error == nil || res.Error.Code != schemas.CodeAttemptsExhausted {
		t.Fatalf("record %+v, want failed %s", res, schemas.CodeAttemptsExhausted)
	}
	if want := schemas.CodeAttemptTimeout; !strings.Contains(res.Error.Message, want) {
		t.Fatalf("error %q does not name the last error %s", res.Error.Message, want)
	}
	if n := e.streamMsgs("RESULTS"); n != 1 {
		t.Fatalf("RESULTS holds %d records, want 1", n)
	}
}

// A worker told to stop a timed-out attempt for a retry reports it with the
// text it sent, and the retry resumes from exactly that text, not from the
// dispatcher's own copy, which may lag behind events still on their way (a
// retry resumed from it made half the callers' streams diverge: the red
// team's R9-3). The report here carries text no progress event did.
// Mutation caught: attemptTimedOut retrying at once (retryableFailure)
// instead of waiting for the report (attempt 2's resume is empty).
func TestAttemptTimeoutResumesFromTheWorkersReport(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	resumes := make(chan *schemas.Resume, 4)
	e.startWorker("w1", 2, []string{"m"}, func(aj schemas.AssignedJob) jobPlan {
		if aj.Attempt == 1 {
			return jobPlan{Hang: true}
		}
		resumes <- aj.Resume
		return jobPlan{}
	})
	cancels := e.cancelsTo("w1")
	cfg := testConfig("d1", e.connect("d1"))
	cfg.AttemptTimeout = 300 * time.Millisecond
	cfg.DeadlineGrace = time.Minute // only the report may end the attempt
	_, stop := runDispatcher(t, cfg)
	defer stop()

	j := newJob("reported", "m", schemas.PriorityNormal)
	e.mustSubmit(j)
	var c schemas.CancelMsg
	select {
	case m := <-cancels:
		if err := json.Unmarshal(m.Data, &c); err != nil || !c.Retry || c.Attempt != 1 {
			t.Fatalf("cancel %s, want a retry stop of attempt 1", m.Data)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the timed-out attempt was not stopped")
	}
	// What the worker sent the caller before it stopped, as its report says.
	rep, _ := json.Marshal(schemas.AttemptReportMsg{JobID: j.ID, Tenant: j.Tenant, Attempt: 1, WorkerID: "w1",
		Error: schemas.ErrorInfo{Code: schemas.CodeAttemptTimeout, Message: "stopped", Retryable: true},
		Text:  "sent before the stop", Seq: 3, CompletionTokens: 4, ReportedAt: time.Now().UTC()})
	w1 := e.connect("w1-reporter")
	if err := w1.PublishRequest(subjects.Attempt("w1"), w1.NewInbox(), rep); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-resumes:
		if r == nil || r.Text != "sent before the stop" || r.CompletionTokens != 4 {
			t.Fatalf("attempt 2 resumes from %+v, want the worker's report", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no second attempt after the report")
	}
	if res := e.waitResult(j.ID, 15*time.Second); res.Status != schemas.StatusCompleted || res.Attempt != 2 {
		t.Fatalf("record %s at attempt %d, want completed at 2", res.Status, res.Attempt)
	}
}

// A worker's runtime_busy reports (a tenant over its compile budget on that
// runtime) do not count against the worker's breaker: three of them opened it
// and took the worker from every tenant for the cooldown (the red team's
// R10-1).
// Mutation caught: onAttemptReport recording every report as a failure (the
// breaker opens, the jobs wait out the hour's cooldown).
func TestRuntimeBusyReportsLeaveTheBreakerClosed(t *testing.T) {
	t.Parallel()
	code := schemas.CodeRuntimeBusy
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w1", 4, []string{"m"}, func(aj schemas.AssignedJob) jobPlan {
		if aj.Attempt == 1 {
			return jobPlan{Hang: true}
		}
		return jobPlan{}
	})
	cfg := testConfig("d1", e.connect("d1"))
	cfg.BreakerThreshold = 2
	cfg.BreakerCooldown = time.Hour
	cfg.MaxAttempts = 5
	d, stop := runDispatcher(t, cfg)
	defer stop()

	var jobs []*schemas.JobRequest
	for i := range 3 {
		j := newJob(fmt.Sprintf("%s-%d", code, i), "m", schemas.PriorityNormal)
		e.mustSubmit(j)
		jobs = append(jobs, j)
	}
	waitFor(t, 10*time.Second, "the three jobs running on w1", func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		n := 0
		for _, j := range d.jobs {
			if j.state == StateRunning && j.workerID == "w1" {
				n++
			}
		}
		return n == 3
	})
	w1 := e.connect("w1-reporter")
	for _, j := range jobs {
		rep, _ := json.Marshal(schemas.AttemptReportMsg{JobID: j.ID, Tenant: j.Tenant, Attempt: 1, WorkerID: "w1",
			Error:      schemas.ErrorInfo{Code: code, Message: "compile budget or a failed step", Retryable: true},
			ReportedAt: time.Now().UTC()})
		if err := w1.PublishRequest(subjects.Attempt("w1"), w1.NewInbox(), rep); err != nil {
			t.Fatal(err)
		}
	}
	for _, j := range jobs {
		if r := e.waitResult(j.ID, 15*time.Second); r.Status != schemas.StatusCompleted || r.Attempt != 2 {
			t.Fatalf("%s: %s at attempt %d, want completed at 2 on w1", j.ID, r.Status, r.Attempt)
		}
	}
	d.mu.Lock()
	st := d.workers["w1"].br.State()
	d.mu.Unlock()
	if st != breaker.Closed {
		t.Fatalf("w1's breaker %s after %s reports", st, code)
	}
}
