package worker

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A cancel that names another attempt than the one running does not stop it:
// a dispatcher that gave up on attempt 1 (attempt_timeout) tells the worker to
// stop attempt 1, and that cancel may arrive after attempt 2 of the same job
// was placed on the same worker. The job here runs at attempt 1 and is sent a
// cancel for attempt 2 right after its first token: it completes.
// Mutation caught: dropping the attempt check in handleCancel (the job ends
// cancelled).
func TestE2ECancelOfAnotherAttemptIsIgnored(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, realConfig(t, b, "w-cancel-attempt"), true)
	ctx := within(t, 60*time.Second)

	j := newJob("Keep going", 300)
	c := collect(t, b.nc, j.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", j)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	if tok, _ := c.next(ctx); tok == nil {
		t.Fatal("no token before the result")
	}
	cm, _ := json.Marshal(schemas.CancelMsg{JobID: j.ID, Tenant: j.Tenant, Attempt: 2, Reason: "attempt timed out", RequestedAt: time.Now().UTC()})
	if err := b.nc.PublishRequest(subjects.WorkerCancel(a.ID()), b.nc.NewInbox(), cm); err != nil {
		t.Fatal(err)
	}
	r := c.untilResult(ctx)
	if r.Status != schemas.StatusCompleted || r.Attempt != 1 {
		t.Fatalf("result %s at attempt %d, want completed at attempt 1 (the cancel named attempt 2)", r.Status, r.Attempt)
	}
}

// A retry stop (its dispatcher gave up on the attempt: attempt_timeout) ends
// the attempt with an attempt report carrying exactly the text the caller was
// sent, and no record: the job runs again from there.
// Mutation caught: handleCancel ignoring Retry (the job ends cancelled, with
// a record and no report).
func TestE2ERetryStopReportsWhatWasSent(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, realConfig(t, b, "w-retry-stop"), true)
	ctx := within(t, 60*time.Second)

	j := newJob("Keep going until told", 3000)
	c := collect(t, b.nc, j.ReplyTo)
	reports := attemptReports(t, b.nc, a.ID())
	if rep := assign(t, b.nc, a.ID(), batch("tiny", j)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	if tok, _ := c.next(ctx); tok == nil {
		t.Fatal("no token before the result")
	}
	cm, _ := json.Marshal(schemas.CancelMsg{JobID: j.ID, Tenant: j.Tenant, Attempt: 1, Retry: true, Reason: "attempt timed out", RequestedAt: time.Now().UTC()})
	if err := b.nc.PublishRequest(subjects.WorkerCancel(a.ID()), b.nc.NewInbox(), cm); err != nil {
		t.Fatal(err)
	}
	var rep schemas.AttemptReportMsg
	select {
	case m := <-reports:
		if err := json.Unmarshal(m.Data, &rep); err != nil {
			t.Fatal(err)
		}
	case <-ctx.Done():
		t.Fatal("no attempt report after the retry stop")
	}
	// Every event the attempt published came before its report, on this connection.
	for drained := false; !drained; {
		select {
		case m := <-c.ch:
			var ev schemas.TokenEventMsg
			if json.Unmarshal(m.Data, &ev) != nil || ev.Type != "token" {
				t.Fatalf("the stopped attempt sent %s", m.Data)
			}
			c.tokens = append(c.tokens, ev)
		default:
			drained = true
		}
	}
	var sent strings.Builder
	for _, ev := range c.tokens {
		sent.WriteString(ev.Delta)
	}
	if rep.Error.Code != schemas.CodeAttemptTimeout || !rep.Error.Retryable || rep.Attempt != 1 || rep.Text != sent.String() || rep.Seq != len(c.tokens) {
		t.Fatalf("attempt report %+v after %d events %q", rep, len(c.tokens), sent.String())
	}
	if n := resultsCount(t, b.js, j.ID); n != 0 {
		t.Fatalf("a stopped attempt wrote %d RESULTS records", n)
	}
}
