package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// The attack table: each action a credential tries, and what became of it.

type attackRow struct {
	actor, action, outcome string
	refused                bool
	control                bool // a granted action, checked to be allowed
}

type attackTable struct {
	t   *testing.T
	s   *authStack
	mon *attackMonitor

	mu    sync.Mutex
	rows  []*attackRow
	later []func(ctx context.Context)
}

func (at *attackTable) add(actor, action string, refused bool, outcome string) *attackRow {
	r := &attackRow{actor: actor, action: action, refused: refused, outcome: outcome}
	at.mu.Lock()
	at.rows = append(at.rows, r)
	at.mu.Unlock()
	return r
}

func (at *attackTable) forged() float64 {
	v, err := at.s.metric("mlx_dispatcher_forged_records_total")
	if err != nil {
		at.t.Fatal(err)
	}
	return v
}

// waitForged waits up to d for the forged counter to pass before.
func (at *attackTable) waitForged(before float64, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if at.forged() > before {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

const violationWait = 2 * time.Second

// pubDenied publishes on subj as c would reach it: a $JS.API or $KV subject
// under c's JetStream API prefix when c is in an account of its own
// (apiFor). Published unprefixed, such a subject reaches no stream whatever
// the grants say, and the row would prove nothing about them.
func (at *attackTable) pubDenied(c *busClient, what, subj string) {
	subj = apiFor(c.name, subj)
	if err := c.nc.Publish(subj, []byte(`{"job_id":"bq1","tenant":"b","status":"completed","text":"PWNED"}`)); err != nil {
		at.add(c.name, what+" ("+subj+")", true, "refused by the client: "+err.Error())
		return
	}
	if c.violation("Publish", subj, violationWait) {
		at.add(c.name, "publish "+subj+": "+what, true, "permission violation")
		return
	}
	at.add(c.name, "publish "+subj+": "+what, false, "SUCCEEDED: no permission violation")
}

func (at *attackTable) subDenied(c *busClient, what, subj string) {
	sub, err := c.nc.SubscribeSync(subj)
	if err != nil {
		at.add(c.name, "subscribe "+subj+": "+what, true, "refused by the client: "+err.Error())
		return
	}
	defer sub.Unsubscribe()
	if c.violation("Subscription", subj, violationWait) {
		at.add(c.name, "subscribe "+subj+": "+what, true, "permission violation")
		return
	}
	at.add(c.name, "subscribe "+subj+": "+what, false, "SUCCEEDED: no permission violation")
}

// controlSub and controlPub check the harness: a grant the role has raises
// no violation (else every "permission violation" above could be noise).
func (at *attackTable) controlSub(c *busClient, actor, what, subj string) {
	sub, err := c.nc.SubscribeSync(subj)
	if err == nil {
		defer sub.Unsubscribe()
	}
	if err != nil || c.violation("Subscription", subj, 500*time.Millisecond) {
		at.t.Errorf("control: %s may %s (%s), but was refused (%v)", actor, what, subj, err)
		return
	}
	at.add(c.name, "control: subscribe "+subj+": "+what, true, "allowed, as granted").control = true
}

func (at *attackTable) controlPub(c *busClient, actor, what, subj string) {
	err := c.nc.Publish(subj, nil)
	if err != nil || c.violation("Publish", subj, 500*time.Millisecond) {
		at.t.Errorf("control: %s may %s (%s), but was refused (%v)", actor, what, subj, err)
		return
	}
	at.add(c.name, "control: publish "+subj+": "+what, true, "allowed, as granted").control = true
}

// controlFleet checks that c still reads the fleet (the gateway's model list
// and readiness) with the registry grants left to it: no consumer, only
// STREAM.INFO and direct gets.
func (at *attackTable) controlFleet(ctx context.Context, c *busClient) {
	hbs, err := registry.Snapshot(ctx, c.js)
	if err != nil || len(hbs) == 0 {
		at.t.Errorf("control: %s reads the worker registry: %d heartbeats, %v", c.name, len(hbs), err)
		return
	}
	at.add(c.name, fmt.Sprintf("control: snapshot of the worker registry (%d workers)", len(hbs)), true, "allowed, as granted").control = true
}

// forgeDone hands a terminal record over as w1 for a job w1 does not run.
// onWorker: the job runs on another worker now, so the dispatcher holds it
// and must count the forgery.
func (at *attackTable) forgeDone(c *busClient, what, did, tenant, id string, attempt int, onWorker bool) {
	action := "request " + subjects.Done("w1", did) + ": " + what
	res := schemas.ResultMsg{Type: "result", JobID: id, Tenant: tenant, Attempt: attempt, Seq: 1, Status: schemas.StatusCompleted,
		FinishReason: "stop", Text: "PWNED by w1", WorkerID: "w2", Model: at.s.modelID(), FinishedAt: time.Now().UTC()}
	data := mustJSON(res)
	if err := schemas.Validate(schemas.Result, data); err != nil {
		at.t.Fatalf("forged record is not schema-valid, the attack would be too weak: %v", err)
	}
	before := at.forged()
	m, err := c.nc.Request(subjects.Done("w1", did), data, 5*time.Second)
	if err != nil {
		at.add(c.name, action, false, "no answer: "+err.Error())
		return
	}
	var rep schemas.FinishReplyMsg
	_ = json.Unmarshal(m.Data, &rep)
	if rep.Status != schemas.FinishUnknown {
		if w := at.mon.ranOn(tenant+"/"+id, "w1", attempt); w {
			at.add(c.name, action, true, "inconclusive: w1 itself ran that attempt meanwhile (reply "+rep.Status+")")
			return
		}
		at.add(c.name, action, false, "SUCCEEDED: reply "+rep.Status)
		return
	}
	outcome := "reply unknown"
	if onWorker {
		if !at.waitForged(before, 2*time.Second) {
			if at.mon.resultWritten(tenant, id) {
				outcome += " (the job had ended already; not counted)"
			} else {
				at.add(c.name, action, false, "reply unknown but not counted as forged")
				return
			}
		} else {
			outcome += ", counted forged"
		}
	}
	at.add(c.name, action, true, outcome)
}

// forgeAttempt reports, as w1, a retryable failure of a job running on w2.
func (at *attackTable) forgeAttempt(c *busClient, what, tenant, id string, attempt int) {
	action := "publish " + subjects.Attempt("w1") + ": " + what
	r := schemas.AttemptReportMsg{JobID: id, Tenant: tenant, Attempt: attempt, WorkerID: "w2",
		Error: schemas.ErrorInfo{Code: "runtime_error", Message: "PWNED"}, Text: "PWNED by w1", ReportedAt: time.Now().UTC()}
	before := at.forged()
	// With a reply subject, as a worker sends it: without one the dispatcher
	// drops it as relayed before any check (subjects.Sent; relayRecord).
	if err := c.nc.PublishRequest(subjects.Attempt("w1"), c.nc.NewInbox(), mustJSON(r)); err != nil {
		at.t.Fatal(err)
	}
	if at.waitForged(before, 2*time.Second) {
		at.add(c.name, action, true, "ignored, counted forged")
		return
	}
	if at.mon.resultWritten(tenant, id) {
		at.add(c.name, action, true, "ignored (the job had ended already)")
		return
	}
	at.add(c.name, action, false, "SUCCEEDED: not counted as forged")
}

// stillOnW2: the forgeries changed nothing for the jobs on w2 — no second
// assignment (a retry). Checked after the drain (runLater), when every job has
// ended and so every assignment there will be has been seen: a look a fixed
// while after the forgeries could come before a retry's backoff ran out, and
// pass however the forgeries fared. No fault is injected here: only an attack
// that worked can retry a job.
func (at *attackTable) stillOnW2(onW2 map[string]int) {
	at.later = append(at.later, func(context.Context) {
		for k, attempt := range onW2 {
			if n := at.mon.maxAttempt(k); n != attempt {
				at.add("worker-w1", "effect of the forgeries on "+k, false, fmt.Sprintf("SUCCEEDED: assigned again at attempt %d (retried)", n))
			}
		}
	})
}

// forgeAdopt offers, as w1, a completed record of a job for adoption
// (subjects.Adopt) with token: a made-up one, or a real one of another job or
// worker. The dispatchers' key is derived from their credential, which no
// worker has, and each token binds one job, attempt, model and worker.
func (at *attackTable) forgeAdopt(c *busClient, what, tenant, id string, attempt int, token string) {
	action := "request " + subjects.Adopt("w1") + ": " + what
	res := schemas.ResultMsg{Type: "result", JobID: id, Tenant: tenant, Attempt: attempt, Seq: 1, Status: schemas.StatusCompleted,
		FinishReason: "stop", Text: "PWNED by w1", WorkerID: "w1", Model: at.s.modelID(), FinishedAt: time.Now().UTC()}
	m := nats.NewMsg(subjects.Adopt("w1"))
	m.Data = mustJSON(res)
	m.Header.Set(subjects.HeaderPlacement, token)
	before := at.forged()
	reply, err := c.nc.RequestMsg(m, 5*time.Second)
	if err != nil {
		at.add(c.name, action, false, "no answer: "+err.Error())
		return
	}
	var rep schemas.FinishReplyMsg
	_ = json.Unmarshal(reply.Data, &rep)
	if rep.Status != schemas.FinishUnknown {
		at.add(c.name, action, false, "SUCCEEDED: reply "+rep.Status)
		return
	}
	if !at.waitForged(before, 2*time.Second) {
		at.add(c.name, action, false, "reply unknown but not counted as forged")
		return
	}
	at.add(c.name, action, true, "reply unknown, counted forged")
}

func (at *attackTable) garbageDone(c *busClient, what, did string, body []byte) {
	action := "publish " + subjects.Done("w1", did) + ": " + what
	before := at.forged()
	if err := c.nc.PublishRequest(subjects.Done("w1", did), c.nc.NewInbox(), body); err != nil {
		at.add(c.name, action, true, "refused by the client: "+err.Error())
		return
	}
	if at.waitForged(before, 3*time.Second) {
		at.add(c.name, action, true, "ignored, counted forged")
		return
	}
	at.add(c.name, action, false, "SUCCEEDED: not counted as forged")
}

// replyInjection publishes a forged token and terminal event for b's job on
// its reply subject: allowed to workers (mlx.reply.>); b's client must still
// end with the stored record (checked after the drain).
func (at *attackTable) replyInjection(c *busClient, bc *bClient, id string) {
	action := "forged terminal event on b's reply subject of " + id
	subj := bus.ReplySubject("b", id)
	tok := schemas.TokenEventMsg{Type: "token", JobID: id, Attempt: 1, Seq: 0, Delta: "PWNED ", Tokens: 1}
	res := schemas.ResultMsg{Type: "result", JobID: id, Tenant: "b", Attempt: 1, Seq: 1, Status: schemas.StatusCompleted,
		FinishReason: "stop", Text: "PWNED by w1", WorkerID: "w2", FinishedAt: time.Now().UTC()}
	_ = c.nc.Publish(subj, mustJSON(tok))
	_ = c.nc.Publish(subj, mustJSON(res))
	if c.violation("Publish", subj, violationWait) {
		at.add(c.name, action, true, "permission violation")
		return
	}
	row := at.add(c.name, action, true, "allowed by the server; pending b's client view")
	at.later = append(at.later, func(ctx context.Context) {
		got := bc.terminal(id)
		switch {
		case got == nil:
			row.refused, row.outcome = false, "b's client saw no terminal"
		case strings.Contains(got.Text, "PWNED"):
			row.refused, row.outcome = false, fmt.Sprintf("SUCCEEDED: b's client took the forged terminal (%q), not the stored record", got.Text)
		default:
			row.outcome = "allowed by the server, but b's client ended with the stored record"
		}
	})
}

// invalidJob publishes body on the attacker's own job subject (allowed): the
// dispatcher must fail it invalid_request under tenant a, with no record
// under b and no terminal event anywhere but a's namespace.
func (at *attackTable) invalidJob(c *busClient, what, id string, body []byte) {
	action := "submit on " + subjects.Job("a", "normal", id) + ": " + what
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.js.Publish(ctx, subjects.Job("a", "normal", id), body); err != nil {
		at.add(c.name, action, true, "refused by JetStream: "+err.Error())
		return
	}
	row := at.add(c.name, action, false, "pending")
	at.later = append(at.later, func(ctx context.Context) {
		res, err := results.Fetch(ctx, at.s.adminJS, "a", id)
		switch {
		case err != nil:
			row.outcome = "no record under a: " + err.Error()
		case res.Status != schemas.StatusFailed || res.Error == nil || res.Error.Code != "invalid_request":
			row.outcome = fmt.Sprintf("SUCCEEDED: ran, record %s %+v", res.Status, res.Error)
		default:
			row.refused, row.outcome = true, "failed invalid_request under a"
		}
	})
}

func (at *attackTable) tooLarge(c *busClient, what, subj string) {
	err := c.nc.Publish(subj, make([]byte, 2<<20))
	if errors.Is(err, nats.ErrMaxPayload) {
		at.add(c.name, "submit on "+subj+": "+what, true, "refused: maximum payload exceeded")
		return
	}
	at.add(c.name, "submit on "+subj+": "+what, false, fmt.Sprintf("SUCCEEDED: publish returned %v", err))
}

// rawDeadLetter publishes on a literal wildcard under the attacker's own
// job subjects: stored by JOBS, it must be dead-lettered raw and terminated.
func (at *attackTable) rawDeadLetter(c *busClient, what, subj string, body []byte) {
	action := "submit on " + subj + ": " + what
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ack, err := c.js.Publish(ctx, subj, body)
	if err != nil {
		at.add(c.name, action, true, "refused: "+err.Error())
		return
	}
	row := at.add(c.name, action, false, "pending")
	at.later = append(at.later, func(ctx context.Context) {
		dlq, err := at.s.adminJS.Stream(ctx, subjects.StreamDLQ)
		if err != nil {
			row.outcome = err.Error()
			return
		}
		m, err := dlq.GetLastMsgForSubject(ctx, subjects.RawDLQ(ack.Sequence))
		if err != nil {
			row.outcome = "SUCCEEDED: no raw dead letter: " + err.Error()
			return
		}
		var rec schemas.DLQRecordMsg
		if json.Unmarshal(m.Data, &rec) != nil || rec.RawSubject != subj {
			row.outcome = "raw dead letter for another subject: " + string(m.Data)
			return
		}
		row.refused, row.outcome = true, "raw dead letter "+subjects.RawDLQ(ack.Sequence)
	})
}

// noStream publishes on a subject its grant allows but no stream stores (an
// unknown priority): nothing may be queued.
func (at *attackTable) noStream(c *busClient, what, subj string) {
	action := "submit on " + subj + ": " + what
	if err := c.nc.Publish(subj, []byte(`{}`)); err != nil {
		at.t.Fatal(err)
	}
	if err := c.nc.FlushTimeout(5 * time.Second); err != nil {
		at.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	jobs, err := at.s.adminJS.Stream(ctx, subjects.StreamJobs)
	if err != nil {
		at.t.Fatal(err)
	}
	_, err = jobs.GetLastMsgForSubject(ctx, subj)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		at.add(c.name, action, true, "not stored: no stream takes that subject")
		return
	}
	at.add(c.name, action, false, fmt.Sprintf("SUCCEEDED: stored in JOBS (%v)", err))
}

func (at *attackTable) jsRefused(c *busClient, what, subj string, body []byte, hdr, val string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m := nats.NewMsg(subj)
	m.Data = body
	m.Header.Set(hdr, val)
	_, err := c.js.PublishMsg(ctx, m)
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		at.add(c.name, "publish "+subj+": "+what, true, "refused by JetStream: "+apiErr.Description)
		return
	}
	at.add(c.name, "publish "+subj+": "+what, false, fmt.Sprintf("SUCCEEDED: %v", err))
}

// directGetBody asks the direct get a's grant allows, with b's subject in the
// body: the server must not answer with b's record.
func (at *attackTable) directGetBody(c *busClient, bc *bClient) {
	subj := "$JS.API.DIRECT.GET.RESULTS." + subjects.Result("a", "along0")
	action := "request " + subj + " with body last_by_subj " + subjects.Result("b", "brun0")
	m, err := c.nc.Request(subj, []byte(`{"last_by_subj":"`+subjects.Result("b", "brun0")+`"}`), 5*time.Second)
	if err != nil {
		at.add(c.name, action, true, "no answer: "+err.Error())
		return
	}
	if st := m.Header.Get("Status"); st != "" && len(m.Data) == 0 {
		at.add(c.name, action, true, "refused by JetStream: "+st+" "+m.Header.Get("Description"))
		return
	}
	if strings.Contains(string(m.Data), `"tenant":"b"`) {
		at.add(c.name, action, false, "SUCCEEDED: answered with b's record")
		return
	}
	at.add(c.name, action, true, "answered with a's own record only")
}

// isolatedSameID submits a job of a's own with the id of b's queued job: it
// must be a's job, leaving b's untouched (checked with b's records).
func (at *attackTable) isolatedSameID(c *busClient, p *bus.Client, id string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	action := "submit on " + subjects.Job("a", "normal", id) + ": own job with the id of b's queued " + id
	if _, err := p.Submit(ctx, &schemas.JobRequest{ID: id, Prompt: "PWNED same id", MaxTokens: 4}); err != nil {
		at.add(c.name, action, true, "refused: "+err.Error())
		return
	}
	row := at.add(c.name, action, false, "pending")
	at.later = append(at.later, func(ctx context.Context) {
		res, err := results.Fetch(ctx, at.s.adminJS, "a", id)
		if err != nil || res.Tenant != "a" {
			row.outcome = fmt.Sprintf("no record of its own under a (%v)", err)
			return
		}
		row.refused, row.outcome = true, "isolated: ran as a/"+id+", b/"+id+" checked below"
	})
}

// isolatedCancel cancels, on a's own cancel subject, the id of b's queued job
// with a body naming tenant b: the subject's tenant is the one that counts, so
// b's job must still complete (checked with b's records).
func (at *attackTable) isolatedCancel(c *busClient, id string) {
	subj := subjects.Cancel("a", id)
	action := "cancel on " + subj + ": b's queued " + id + ", body tenant b"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	body := mustJSON(schemas.CancelMsg{JobID: id, Tenant: "b", Reason: "PWNED", RequestedAt: time.Now().UTC()})
	if _, err := c.js.Publish(ctx, subj, body); err != nil {
		at.add(c.name, action, true, "refused: "+err.Error())
		return
	}
	at.add(c.name, action, true, "isolated: names a/"+id+"; b/"+id+" checked below")
}
