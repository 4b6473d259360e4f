package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/auth"
	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// TestTenantAttack attacks a real stack with bus authentication on —
// nats-server from ops/nats/standalone.conf with the nats-auth.conf `auth
// init` generated, a dispatcher and two workers (w1, w2, real runtimes), every
// process connected with its own credential — from inside, with the
// credentials auth init wrote: producer a, worker w1, the gateway and, as a
// control of the harness, the dispatcher and admin. Tenants a and b have jobs
// running (long, saturating every slot) and queued meanwhile. Every action a
// credential can name against tenant b's jobs and the system must be refused:
// by the server (a permission violation reported to the connection's async
// error handler), or by the system (a finish reply "unknown", a job failed
// invalid_request under the attacker's own tenant, a raw dead letter, a
// JetStream error). Then: each of b's jobs ends in exactly one terminal record,
// completed, with text no attacker wrote, and b's client saw that record; no
// record under tenant b for ids only an attacker used; JOBS empty; the
// dispatcher's forged-records counter above 0. The gateway submits, cancels
// and reads for every tenant by design, so only what lies beyond that is
// tried with its credential.
//
// A refused action shows as one table row; an action that succeeds fails the
// test naming it, unless it is listed in knownHoles (a hole found by this
// test, reported, left for a production fix): those are logged as HOLE and
// fail only with CHAOS_ATTACK_STRICT=1.
//
// Mutations it catches (checked by hand): granting the producer
// bus.SubjectJobsAll in auth.PermissionsFor; dropping the j.workerID != wid
// check of dispatcher onDone.
func TestTenantAttack(t *testing.T) {
	ctx := testContext(t, 6*time.Minute)
	runDir := keepOnFailure(t, "mlx-chaos-attack-")
	start := time.Now()
	s := startAuthStack(t, ctx, runDir, []string{"a", "b"}, []string{"w1", "w2"}, 2)
	t.Logf("stack with auth up in %s (dispatcher %s)", time.Since(start).Round(time.Millisecond), s.dispatcherID())
	mon := newAttackMonitor(t, s.admin)
	at := &attackTable{t: t, s: s, mon: mon}
	defer func() {
		if t.Failed() {
			s.dumpLogs(25)
			t.Logf("process logs kept in %s", runDir)
		}
	}()

	pa := s.connect(auth.RoleProducer, "a")
	pb := s.connect(auth.RoleProducer, "b")
	w1 := s.connect(auth.RoleWorker, "w1")
	gw := s.connect(auth.RoleGateway, "")
	dc := s.connect(auth.RoleDispatcher, "")
	model := s.modelID()
	prodA, err := bus.NewProducer(pa.nc, bus.WithTenant("a"), bus.WithDefaultModel(model))
	if err != nil {
		t.Fatal(err)
	}
	prodB, err := bus.NewProducer(pb.nc, bus.WithTenant("b"), bus.WithDefaultModel(model))
	if err != nil {
		t.Fatal(err)
	}

	// Every slot (2 workers x 2) busy with long jobs of both tenants, then b's
	// short jobs queue behind them: the dispatcher has no credit, so they wait
	// in JOBS while the attacks run. b reads every job's stream as a client does.
	const long = 2000 // the tiny model's context ends the job at ~2040 tokens
	bc := newBClient(prodB, pb.nc)
	for i := range 2 {
		if _, err := prodA.Submit(ctx, &schemas.JobRequest{ID: fmt.Sprintf("along%d", i), Prompt: "tenant a long job", MaxTokens: long}); err != nil {
			t.Fatal(err)
		}
		bc.submit(ctx, t, fmt.Sprintf("brun%d", i), long)
	}
	longIDs := []string{"a/along0", "a/along1", "b/brun0", "b/brun1"}
	if err := poll(ctx, 50*time.Millisecond, func() bool {
		for _, k := range longIDs {
			if mon.runningOn(k) == "" {
				return false
			}
		}
		return true
	}); err != nil {
		t.Fatalf("long jobs never all running: %v", err)
	}
	for i := range 3 {
		bc.submit(ctx, t, fmt.Sprintf("bq%d", i), 16)
	}
	queued := []string{"bq0", "bq1", "bq2"}
	onW2 := map[string]int{} // job key -> attempt, running on w2 now
	for _, k := range longIDs {
		if mon.runningOn(k) == "w2" {
			onW2[k] = mon.attemptOf(k)
		}
	}
	t.Logf("saturated after %s: on w2 %v; queued %v", time.Since(start).Round(time.Millisecond), onW2, queued)
	if len(onW2) == 0 {
		t.Fatal("nothing runs on w2: the forged-record attacks would have no target")
	}

	did := s.dispatcherID()
	forgedBefore := at.forged()

	// --- worker w1: time-sensitive first, while the long jobs run.
	for k, attempt := range onW2 {
		tenant, id, _ := strings.Cut(k, "/")
		at.forgeDone(w1, fmt.Sprintf("terminal record for %s running on w2 (attempt %d)", k, attempt), did, tenant, id, attempt, true)
	}
	for _, id := range queued {
		at.forgeDone(w1, "terminal record for b's queued "+id, did, "b", id, 1, false)
	}
	for k, attempt := range onW2 {
		tenant, id, _ := strings.Cut(k, "/")
		at.forgeAttempt(w1, fmt.Sprintf("attempt report for %s running on w2", k), tenant, id, attempt)
	}
	at.stillOnW2(onW2)
	at.forgeDone(w1, "terminal record for b/nosuchjob (an id b never used)", did, "b", "atkw1ghost", 1, false)
	at.garbageDone(w1, "non-JSON body", did, []byte("\x00\xffnot json at all"))
	at.garbageDone(w1, "schema-breaking body", did, []byte(`{"type":"result","job_id":"bq0","tenant":"b","status":"completed","attempt":"one"}`))
	at.garbageDone(w1, "huge body (900 KB)", did, hugeJSON(900<<10))
	at.replyInjection(w1, bc, "bq0")
	at.kvRollup(w1)

	for _, c := range []struct{ what, subj string }{
		{"terminal record as w2", bus.DoneSubject("w2", did)},
		{"attempt report as w2", bus.AttemptSubject("w2")},
		{"cancel on w2's cancel subject", bus.WorkerCancelSubject("w2")},
		{"assignment to w2", bus.AssignSubject("w2")},
		{"write b's record directly", bus.ResultSubject("b", "bq1")},
		{"write a record of its own", bus.ResultSubject("a", "atkw1")},
		{"submit as tenant b", bus.JobSubject("b", "high", "atkw1job")},
		{"cancel b's job", bus.CancelSubject("b", "bq1")},
		{"dead letter", bus.DLQSubject("b", "bq1")},
		{"w2's heartbeat", "$KV.mlx_workers.w2"},
		{"STREAM.MSG.GET on RESULTS", "$JS.API.STREAM.MSG.GET.RESULTS"},
		{"direct get of b's record", "$JS.API.DIRECT.GET.RESULTS." + bus.ResultSubject("b", "brun0")},
		{"STREAM.INFO of RESULTS", "$JS.API.STREAM.INFO.RESULTS"},
		{"purge JOBS", "$JS.API.STREAM.PURGE.JOBS"},
		{"ack a JOBS delivery", "$JS.ACK.JOBS.x.1.1.1.1.0"},
	} {
		at.pubDenied(w1, c.what, c.subj)
	}
	for _, c := range []struct{ what, subj string }{
		{"read every cancel", bus.SubjectCancelAll},
		{"read b's cancels", "mlx.cancel.b.*"},
		{"read w2's assignments", bus.AssignSubject("w2")},
		{"read every assignment", bus.SubjectAssignAll},
		{"read w2's cancels", bus.WorkerCancelSubject("w2")},
		{"read every terminal hand-over", bus.SubjectDoneAll},
		{"read b's token streams", bus.ReplyNamespace("b")},
		{"read RESULTS' subjects", bus.SubjectResultsAll},
		{"read the dispatcher's inbox", "_INBOX.dispatcher.>"},
	} {
		at.subDenied(w1, c.what, c.subj)
	}

	// --- producer a.
	aJob := func(id string) map[string]any {
		return map[string]any{"id": id, "model": model, "prompt": "attack", "max_tokens": 4, "tenant": "a", "reply_to": bus.ReplySubject("a", id)}
	}
	for _, c := range []struct{ what, subj string }{
		{"submit on b's subject", bus.JobSubject("b", "normal", "atkasub")},
		{"submit on b's subject, b's body", bus.JobSubject("b", "high", "atkasub2")},
		{"submit as the default tenant", bus.JobSubject("default", "normal", "atkadef")},
		{"cancel b's queued job", bus.CancelSubject("b", "bq1")},
		{"cancel b's running job", bus.CancelSubject("b", "brun0")},
		{"direct get of b's record", "$JS.API.DIRECT.GET.RESULTS." + bus.ResultSubject("b", "brun0")},
		{"direct get of every record", "$JS.API.DIRECT.GET.RESULTS." + bus.SubjectResultsAll},
		{"direct get, subject in the body", "$JS.API.DIRECT.GET.RESULTS"},
		{"STREAM.MSG.GET on RESULTS", "$JS.API.STREAM.MSG.GET.RESULTS"},
		{"STREAM.INFO of RESULTS", "$JS.API.STREAM.INFO.RESULTS"},
		{"STREAM.INFO of JOBS", "$JS.API.STREAM.INFO.JOBS"},
		{"write b's record", bus.ResultSubject("b", "bq1")},
		{"write its own record", bus.ResultSubject("a", "atkares")},
		{"terminal hand-over as w1", bus.DoneSubject("w1", did)},
		{"attempt report as w1", bus.AttemptSubject("w1")},
		{"cancel on w2's cancel subject", bus.WorkerCancelSubject("w2")},
		{"assignment to w1", bus.AssignSubject("w1")},
		{"dead letter under b", bus.DLQSubject("b", "bq1")},
		{"raw dead letter", bus.RawDLQSubject(1)},
		{"token event into b's stream", bus.ReplySubject("b", "bq1")},
		{"worker heartbeat", "$KV.mlx_workers.w1"},
		{"purge RESULTS", "$JS.API.STREAM.PURGE.RESULTS"},
		{"purge JOBS", "$JS.API.STREAM.PURGE.JOBS"},
		{"purge CANCELS", "$JS.API.STREAM.PURGE.CANCELS"},
		{"delete a JOBS message", "$JS.API.STREAM.MSG.DELETE.JOBS"},
		{"delete stream RESULTS", "$JS.API.STREAM.DELETE.RESULTS"},
		{"update stream JOBS", "$JS.API.STREAM.UPDATE.JOBS"},
		{"create a consumer on JOBS", "$JS.API.CONSUMER.CREATE.JOBS"},
		{"delete the dispatcher's consumer", "$JS.API.CONSUMER.DELETE.JOBS.dispatch-normal"},
		{"ack a JOBS delivery", "$JS.ACK.JOBS.x.1.1.1.1.0"},
	} {
		at.pubDenied(pa, c.what, c.subj)
	}
	for _, c := range []struct{ what, subj string }{
		{"read b's token streams", bus.ReplyNamespace("b")},
		{"read b's stream of bq1", bus.ReplySubject("b", "bq1")},
		{"read every job", bus.SubjectJobsAll},
		{"read every cancel", bus.SubjectCancelAll},
		{"read RESULTS' subjects", bus.SubjectResultsAll},
		{"read every assignment", bus.SubjectAssignAll},
		{"read producer b's inbox", "_INBOX.producer-b.>"},
		{"read every inbox", "_INBOX.>"},
	} {
		at.subDenied(pa, c.what, c.subj)
	}
	// Allowed subjects, refused by the system (checked after the drain).
	bodyB := aJob("atkbodyb")
	bodyB["tenant"] = "b"
	bodyB["reply_to"] = bus.ReplySubject("b", "atkbodyb")
	at.invalidJob(pa, "own subject, body tenant b", "atkbodyb", mustJSON(bodyB))
	replyB := aJob("atkreplyb")
	replyB["reply_to"] = bus.ReplySubject("b", "bq1")
	at.invalidJob(pa, "own subject, reply_to in b's stream of bq1", "atkreplyb", mustJSON(replyB))
	replyWild := aJob("atkreplywild")
	replyWild["reply_to"] = "mlx.reply.a.>"
	at.invalidJob(pa, "own subject, wildcard reply_to", "atkreplywild", mustJSON(replyWild))
	idB := aJob("bq2")
	at.invalidJob(pa, "own subject atkidb, body id = b's bq2", "atkidb", mustJSON(idB))
	at.invalidJob(pa, "own subject, non-JSON body", "atkgarbage", []byte("\x00\x01 not a job"))
	at.invalidJob(pa, "own subject, schema-breaking body", "atkschema", []byte(`{"id":"atkschema","model":7,"prompt":[],"reply_to":"mlx.reply.a.atkschema"}`))
	hugeJob := aJob("atkhuge")
	hugeJob["prompt"] = strings.Repeat("x", 600<<10)
	at.invalidJob(pa, "own subject, huge prompt (600 KB)", "atkhuge", mustJSON(hugeJob))
	at.tooLarge(pa, "own subject, body over max payload (2 MB)", bus.JobSubject("a", "normal", "atktoolarge"))
	at.rawDeadLetter(pa, "literal wildcard subject", "mlx.jobs.a.normal.*", mustJSON(aJob("atkwild")))
	at.rawDeadLetter(pa, "literal full wildcard subject", "mlx.jobs.a.normal.>", mustJSON(aJob("atkwild2")))
	at.noStream(pa, "unknown priority on its own subject", "mlx.jobs.a.urgent.atkprio")
	at.jsRefused(pa, "Nats-Rollup: all on its own job subject (purge JOBS)", bus.JobSubject("a", "normal", "atkrollup"), mustJSON(aJob("atkrollup")), "Nats-Rollup", "all")
	at.jsRefused(pa, "Nats-Rollup: all on its own cancel subject (purge CANCELS)", bus.CancelSubject("a", "atkrollupc"), []byte(`{}`), "Nats-Rollup", "all")
	at.directGetBody(pa, bc)
	at.isolatedSameID(pa, prodA, "bq1")
	at.isolatedCancel(pa, "bq2")
	// Controls: the same mechanisms do answer what a credential may do.
	at.controlSub(pb, "producer b", "read its own token streams", bus.ReplyNamespace("b"))
	at.controlPub(pa, "producer a", "cancel its own (unknown) job", bus.CancelSubject("a", "atkctl"))

	// --- gateway: a producer for every tenant by design; nothing else.
	for _, c := range []struct{ what, subj string }{
		{"write b's record", bus.ResultSubject("b", "bq1")},
		{"terminal hand-over as w1", bus.DoneSubject("w1", did)},
		{"attempt report as w2", bus.AttemptSubject("w2")},
		{"assignment to w1", bus.AssignSubject("w1")},
		{"cancel on w2's cancel subject", bus.WorkerCancelSubject("w2")},
		{"token event into b's stream", bus.ReplySubject("b", "bq1")},
		{"dead letter", bus.DLQSubject("b", "bq1")},
		{"worker heartbeat", "$KV.mlx_workers.w1"},
		{"STREAM.MSG.GET on RESULTS", "$JS.API.STREAM.MSG.GET.RESULTS"},
		{"purge RESULTS", "$JS.API.STREAM.PURGE.RESULTS"},
		{"delete a JOBS message", "$JS.API.STREAM.MSG.DELETE.JOBS"},
		{"create a consumer on JOBS", "$JS.API.CONSUMER.CREATE.JOBS"},
		{"ack a JOBS delivery", "$JS.ACK.JOBS.x.1.1.1.1.0"},
	} {
		at.pubDenied(gw, c.what, c.subj)
	}
	for _, c := range []struct{ what, subj string }{
		{"read every job", bus.SubjectJobsAll},
		{"read every cancel", bus.SubjectCancelAll},
		{"read every assignment", bus.SubjectAssignAll},
		{"read every terminal hand-over", bus.SubjectDoneAll},
		{"read the dispatcher's inbox", "_INBOX.dispatcher.>"},
	} {
		at.subDenied(gw, c.what, c.subj)
	}

	// --- dispatcher (control of the harness: trusted, yet no producer or worker).
	at.pubDenied(dc, "submit as tenant b", bus.JobSubject("b", "normal", "atkdisp"))
	at.pubDenied(dc, "put a worker's heartbeat", "$KV.mlx_workers.w1")
	at.subDenied(dc, "read every inbox", "_INBOX.>")
	at.controlSub(dc, "dispatcher", "read every terminal hand-over", bus.SubjectDoneAll)
	at.controlPub(s.connect(auth.RoleAdmin, ""), "admin", "STREAM.INFO of RESULTS", "$JS.API.STREAM.INFO.RESULTS")

	attackEnd := time.Since(start)
	t.Logf("attacks done %s after start", attackEnd.Round(time.Millisecond))

	// --- the replay of a dead letter, pre-empted through JOBS' duplicate window.
	at.replaySquat(ctx, pa)

	// Everything ends; then the checks.
	dctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	err = poll(dctx, 250*time.Millisecond, func() bool {
		if !bc.allDone() {
			return false
		}
		n, err := streamMsgs(dctx, s.adminJS, bus.StreamJobs)
		return err == nil && n == 0
	})
	cancel()
	if err != nil {
		t.Errorf("drain: b's streams done %v, JOBS not empty or b's jobs unfinished: %v", bc.allDone(), err)
	}
	at.runLater(ctx)
	at.checkB(ctx, bc)
	if f := at.forged(); f <= forgedBefore {
		t.Errorf("mlx_dispatcher_forged_records_total %v: no forgery was counted", f)
	} else {
		t.Logf("mlx_dispatcher_forged_records_total: %v", f)
	}
	at.report()
	t.Logf("TestTenantAttack: %s in all", time.Since(start).Round(time.Millisecond))
}

// knownHoles are actions this test found to succeed, reported for a fix in
// production code and kept out of the test's verdict until then (they fail it
// with CHAOS_ATTACK_STRICT=1). Remove an entry once the hole is closed.
var knownHoles = map[string]string{
	// Empty: the three holes this test found (a worker's forged terminal event
	// on another tenant's reply subject, a registry rollup, a squatted replay
	// msg id) are closed; their actions are refused like every other.
}

// attackRow is one action and what became of it.
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

func (at *attackTable) pubDenied(c *busClient, what, subj string) {
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

// forgeDone hands a terminal record over as w1 for a job w1 does not run.
// onWorker: the job runs on another worker now, so the dispatcher holds it
// and must count the forgery.
func (at *attackTable) forgeDone(c *busClient, what, did, tenant, id string, attempt int, onWorker bool) {
	action := "request " + bus.DoneSubject("w1", did) + ": " + what
	res := schemas.ResultMsg{Type: "result", JobID: id, Tenant: tenant, Attempt: attempt, Seq: 1, Status: schemas.StatusCompleted,
		FinishReason: "stop", Text: "PWNED by w1", WorkerID: "w2", Model: at.s.modelID(), FinishedAt: time.Now().UTC()}
	data := mustJSON(res)
	if err := schemas.Validate(schemas.Result, data); err != nil {
		at.t.Fatalf("forged record is not schema-valid, the attack would be too weak: %v", err)
	}
	before := at.forged()
	m, err := c.nc.Request(bus.DoneSubject("w1", did), data, 5*time.Second)
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
	action := "publish " + bus.AttemptSubject("w1") + ": " + what
	r := schemas.AttemptReportMsg{JobID: id, Tenant: tenant, Attempt: attempt, WorkerID: "w2",
		Error: schemas.ErrorInfo{Code: "runtime_error", Message: "PWNED"}, Text: "PWNED by w1", ReportedAt: time.Now().UTC()}
	before := at.forged()
	if err := c.nc.Publish(bus.AttemptSubject("w1"), mustJSON(r)); err != nil {
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
// assignment (a retry), no record yet unless w2 wrote it.
func (at *attackTable) stillOnW2(onW2 map[string]int) {
	time.Sleep(300 * time.Millisecond)
	for k, attempt := range onW2 {
		if n := at.mon.maxAttempt(k); n != attempt {
			at.add("worker-w1", "effect of the forgeries on "+k, false, fmt.Sprintf("SUCCEEDED: assigned again at attempt %d (retried)", n))
		}
	}
}

func (at *attackTable) garbageDone(c *busClient, what, did string, body []byte) {
	action := "publish " + bus.DoneSubject("w1", did) + ": " + what
	before := at.forged()
	if err := c.nc.Publish(bus.DoneSubject("w1", did), body); err != nil {
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

// kvRollup: a put on w1's own registry key with Nats-Rollup: all would purge
// the bucket's other keys (w2's heartbeat).
func (at *attackTable) kvRollup(c *busClient) {
	action := "Nats-Rollup: all on its own heartbeat key"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kv, err := at.s.adminJS.KeyValue(ctx, bus.BucketWorkers)
	if err != nil {
		at.t.Fatal(err)
	}
	own, err := kv.Get(ctx, "w1")
	if err != nil {
		at.t.Fatal(err)
	}
	m := nats.NewMsg("$KV." + bus.BucketWorkers + ".w1")
	m.Data = own.Value()
	m.Header.Set("Nats-Rollup", "all")
	ack, err := c.js.PublishMsg(ctx, m)
	if err != nil {
		at.add(c.name, action, true, "refused by JetStream: "+err.Error())
		return
	}
	kvs, err := at.s.adminJS.Stream(ctx, "KV_"+bus.BucketWorkers)
	if err != nil {
		at.t.Fatal(err)
	}
	last, err := kvs.GetLastMsgForSubject(ctx, "$KV."+bus.BucketWorkers+".w2")
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		at.add(c.name, action, false, "SUCCEEDED: w2's registry entry erased")
	case err != nil:
		at.t.Fatal(err)
	case last.Sequence > ack.Sequence:
		at.add(c.name, action, false, "SUCCEEDED: w2's registry entry erased (w2 has put a new one since)")
	default:
		at.add(c.name, action, true, "w2's entry survived")
	}
}

// invalidJob publishes body on the attacker's own job subject (allowed): the
// dispatcher must fail it invalid_request under tenant a, with no record
// under b and no terminal event anywhere but a's namespace.
func (at *attackTable) invalidJob(c *busClient, what, id string, body []byte) {
	action := "submit on " + bus.JobSubject("a", "normal", id) + ": " + what
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.js.Publish(ctx, bus.JobSubject("a", "normal", id), body); err != nil {
		at.add(c.name, action, true, "refused by JetStream: "+err.Error())
		return
	}
	row := at.add(c.name, action, false, "pending")
	at.later = append(at.later, func(ctx context.Context) {
		res, err := bus.FetchResult(ctx, at.s.adminJS, "a", id)
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
		dlq, err := at.s.adminJS.Stream(ctx, bus.StreamDLQ)
		if err != nil {
			row.outcome = err.Error()
			return
		}
		m, err := dlq.GetLastMsgForSubject(ctx, bus.RawDLQSubject(ack.Sequence))
		if err != nil {
			row.outcome = "SUCCEEDED: no raw dead letter: " + err.Error()
			return
		}
		var rec schemas.DLQRecordMsg
		if json.Unmarshal(m.Data, &rec) != nil || rec.RawSubject != subj {
			row.outcome = "raw dead letter for another subject: " + string(m.Data)
			return
		}
		row.refused, row.outcome = true, "raw dead letter "+bus.RawDLQSubject(ack.Sequence)
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
	jobs, err := at.s.adminJS.Stream(ctx, bus.StreamJobs)
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
	subj := "$JS.API.DIRECT.GET.RESULTS." + bus.ResultSubject("a", "along0")
	action := "request " + subj + " with body last_by_subj " + bus.ResultSubject("b", "brun0")
	m, err := c.nc.Request(subj, []byte(`{"last_by_subj":"`+bus.ResultSubject("b", "brun0")+`"}`), 5*time.Second)
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
func (at *attackTable) isolatedSameID(c *busClient, p *bus.Producer, id string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	action := "submit on " + bus.JobSubject("a", "normal", id) + ": own job with the id of b's queued " + id
	if _, err := p.Submit(ctx, &schemas.JobRequest{ID: id, Prompt: "PWNED same id", MaxTokens: 4}); err != nil {
		at.add(c.name, action, true, "refused: "+err.Error())
		return
	}
	row := at.add(c.name, action, false, "pending")
	at.later = append(at.later, func(ctx context.Context) {
		res, err := bus.FetchResult(ctx, at.s.adminJS, "a", id)
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
	subj := bus.CancelSubject("a", id)
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

// replaySquat: an admin replays one of b's dead letters; producer a, which
// knows the job's id and can guess the DLQ sequence, published a job of its
// own first with the Nats-Msg-Id replay will use. The replay must still run
// b's job.
func (at *attackTable) replaySquat(ctx context.Context, c *busClient) {
	action := "squat b's replay Nats-Msg-Id, then admin replays b's dead letter"
	id := "bdead"
	job := schemas.JobRequest{ID: id, Model: at.s.modelID(), Prompt: "tenant b dead-lettered job", MaxTokens: 8, Tenant: "b",
		Priority: schemas.PriorityNormal, ReplyTo: bus.ReplySubject("b", id)}
	rec := schemas.DLQRecordMsg{Job: job, Reason: "attempts_exhausted", Attempts: 3,
		LastError: schemas.ErrorInfo{Code: "runtime_error", Message: "stand-in dead letter written by the test"}, DeadAt: time.Now().UTC(), DispatcherID: "test"}
	ack, err := at.s.adminJS.Publish(ctx, bus.DLQSubject("b", id), mustJSON(rec))
	if err != nil {
		at.t.Fatal(err)
	}
	squat := map[string]any{"id": "atksquat", "model": at.s.modelID(), "prompt": "squat", "max_tokens": 4, "tenant": "a", "reply_to": bus.ReplySubject("a", "atksquat")}
	if _, err := c.js.Publish(ctx, bus.JobSubject("a", "normal", "atksquat"), mustJSON(squat),
		jetstream.WithMsgID(fmt.Sprintf("%s.replay.%d", id, ack.Sequence))); err != nil {
		at.add(c.name, action, true, "refused: "+err.Error())
		return
	}
	cmd := exec.CommandContext(ctx, at.s.mlxBin, "replay", "--id", id, "--nats", at.s.nats.urlList())
	cmd.Env = append(os.Environ(), at.s.credEnv(auth.RoleAdmin, "")...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		at.t.Fatalf("replay: %v\n%s", err, out)
	}
	row := at.add(c.name, action, false, "pending")
	at.later = append(at.later, func(ctx context.Context) {
		wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		var res *schemas.ResultMsg
		_ = poll(wctx, 250*time.Millisecond, func() bool {
			res, err = bus.FetchResult(wctx, at.s.adminJS, "b", id)
			return err == nil
		})
		if res != nil && res.Status == schemas.StatusCompleted {
			row.refused, row.outcome = true, "b's replayed job completed"
			return
		}
		dlq, _ := at.s.adminJS.Stream(ctx, bus.StreamDLQ)
		_, derr := dlq.GetLastMsgForSubject(ctx, bus.DLQSubject("b", id))
		row.outcome = fmt.Sprintf("SUCCEEDED: replay said %q; b's job has no record (%v), dead letter gone (%v), JOBS never got it: lost",
			strings.TrimSpace(string(out)), err, derr != nil)
	})
}

func (at *attackTable) runLater(ctx context.Context) {
	for _, f := range at.later {
		f(ctx)
	}
}

// checkB: every one of b's jobs has exactly one record, completed, written
// from the worker that ran it, with text no attacker wrote; b's client ended
// with that record; b's reply subjects carried exactly one terminal event not
// an attacker's; no record under b for an id only an attacker used.
func (at *attackTable) checkB(ctx context.Context, bc *bClient) {
	t := at.t
	counts, err := resultCounts(ctx, at.s.adminJS)
	if err != nil {
		t.Fatal(err)
	}
	bc.mu.Lock()
	ids := append([]string(nil), bc.ids...)
	bc.mu.Unlock()
	var lost, dup []string
	for _, id := range ids {
		subj := bus.ResultSubject("b", id)
		switch n := counts[subj]; {
		case n == 0:
			lost = append(lost, id)
			continue
		case n > 1:
			dup = append(dup, fmt.Sprintf("%s: %d records", id, n))
		}
		res, err := bus.FetchResult(ctx, at.s.adminJS, "b", id)
		if err != nil {
			t.Errorf("b/%s: %v", id, err)
			continue
		}
		if res.Status != schemas.StatusCompleted || strings.Contains(res.Text, "PWNED") || res.Tenant != "b" {
			t.Errorf("b/%s ended %s (tenant %q, worker %s, error %+v) with text %q: not b's own completed run", id, res.Status, res.Tenant, res.WorkerID, res.Error, res.Text)
		}
		if !at.mon.ranOn("b/"+id, res.WorkerID, res.Attempt) {
			t.Errorf("b/%s: record names worker %s attempt %d, which was never assigned that attempt", id, res.WorkerID, res.Attempt)
		}
		if got := bc.terminal(id); got == nil || got.Text != res.Text || got.Status != res.Status {
			if _, known := knownHoles["worker-w1: forged terminal event on b's reply subject of "+id]; !known || got == nil {
				t.Errorf("b/%s: b's client ended with %+v, the record is %q", id, got, res.Text)
			}
		}
		if n := at.mon.honestTerminals(bus.ReplySubject("b", id)); n != 1 {
			dup = append(dup, fmt.Sprintf("%s: %d terminal events on its reply subject", id, n))
		}
	}
	var foreign []string
	for subj := range counts {
		// bdead is b's too: the replay row judges it.
		if id, ok := strings.CutPrefix(subj, bus.ResultsPrefix+".b."); ok && !slicesContains(ids, id) && id != "bdead" {
			foreign = append(foreign, id)
		}
	}
	sort.Strings(foreign)
	t.Logf("tenant b: %d jobs, %d lost, %d duplicated, %d records for ids b never used", len(ids), len(lost), len(dup), len(foreign))
	if len(lost) > 0 {
		t.Errorf("LOST: b's jobs without a record: %v", lost)
	}
	if len(dup) > 0 {
		t.Errorf("DUPLICATED: %v", dup)
	}
	if len(foreign) > 0 {
		t.Errorf("records under tenant b for ids only an attacker used: %v", foreign)
	}
}

func slicesContains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// report logs the table and fails the test for every action that succeeded.
func (at *attackTable) report() {
	t := at.t
	strict := os.Getenv("CHAOS_ATTACK_STRICT") == "1"
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "actor\taction\tverdict\toutcome")
	refused, holes, controls := 0, 0, 0
	for _, r := range at.rows {
		verdict := "refused"
		switch {
		case r.control:
			verdict = "control ok"
			controls++
		case r.refused:
			refused++
		default:
			key := r.actor + ": " + r.action
			if why, known := knownHoles[key]; known {
				holes++
				verdict = "HOLE (known)"
				t.Logf("HOLE (known): %s — %s: %s", key, r.outcome, why)
				if strict {
					t.Errorf("CHAOS_ATTACK_STRICT: %s — %s", key, r.outcome)
				}
			} else {
				verdict = "SUCCEEDED"
				t.Errorf("ACTION SUCCEEDED: %s — %s", key, r.outcome)
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", r.actor, r.action, verdict, r.outcome)
	}
	tw.Flush()
	t.Logf("%d actions: %d refused, %d known holes, %d succeeded (and %d controls allowed)\n%s",
		len(at.rows)-controls, refused, holes, len(at.rows)-controls-refused-holes, controls, b.String())
}

// bClient is tenant b's client: each job submitted with bus.SubmitStream and
// read to its terminal event, as a service would.
type bClient struct {
	p  *bus.Producer
	nc *nats.Conn

	mu    sync.Mutex
	ids   []string
	terms map[string]*schemas.ResultMsg
	open  int
}

func newBClient(p *bus.Producer, nc *nats.Conn) *bClient {
	return &bClient{p: p, nc: nc, terms: map[string]*schemas.ResultMsg{}}
}

func (bc *bClient) submit(ctx context.Context, t testing.TB, id string, maxTokens int) {
	t.Helper()
	st, _, err := bus.SubmitStream(ctx, bc.p, bc.nc, &schemas.JobRequest{ID: id, Prompt: "tenant b job " + id, MaxTokens: maxTokens}, bus.StreamOptions{})
	if err != nil {
		t.Fatalf("b submits %s: %v", id, err)
	}
	bc.mu.Lock()
	bc.ids = append(bc.ids, id)
	bc.open++
	bc.mu.Unlock()
	go func() {
		defer st.Close()
		var res *schemas.ResultMsg
		for ev, err := range st.Events(ctx) {
			if err != nil {
				break
			}
			if ev.Result != nil {
				res = ev.Result
			}
		}
		bc.mu.Lock()
		bc.terms[id] = res
		bc.open--
		bc.mu.Unlock()
	}()
}

func (bc *bClient) allDone() bool {
	bc.mu.Lock()
	defer bc.mu.Unlock()
	return bc.open == 0
}

func (bc *bClient) terminal(id string) *schemas.ResultMsg {
	bc.mu.Lock()
	defer bc.mu.Unlock()
	return bc.terms[id]
}

// attackMonitor is the admin's view of the wire: assignments offered and
// accepted (the accept is the worker's answer on the dispatcher's inbox),
// RESULTS writes, and terminal events on reply subjects.
type attackMonitor struct {
	mu        sync.Mutex
	offers    map[string]assignOffer // batch id -> offer
	running   map[string]assignOffer // job key -> the accepted assignment
	assigns   map[string][]assignOffer
	results   map[string]int      // result subject -> writes seen
	terminals map[string][]string // reply subject -> terminal texts
}

type assignOffer struct {
	worker  string
	attempt int
	jobs    []string
}

func newAttackMonitor(t testing.TB, nc *nats.Conn) *attackMonitor {
	t.Helper()
	m := &attackMonitor{offers: map[string]assignOffer{}, running: map[string]assignOffer{}, assigns: map[string][]assignOffer{},
		results: map[string]int{}, terminals: map[string][]string{}}
	for _, subj := range []string{"mlx.>", "_INBOX.dispatcher.>"} {
		sub, err := nc.Subscribe(subj, m.observe)
		if err != nil {
			t.Fatal(err)
		}
		if err := sub.SetPendingLimits(-1, -1); err != nil {
			t.Fatal(err)
		}
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return m
}

func (m *attackMonitor) observe(msg *nats.Msg) {
	subj := msg.Subject
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case strings.HasPrefix(subj, "mlx.worker.") && strings.HasSuffix(subj, ".assign"):
		var a schemas.AssignmentMsg
		if json.Unmarshal(msg.Data, &a) != nil {
			return
		}
		w := bus.WorkerOfSubject(subj)
		for _, j := range a.Jobs {
			k := bus.JobRef{Tenant: j.Job.Tenant, ID: j.Job.ID}.Key()
			o := assignOffer{worker: w, attempt: j.Attempt, jobs: []string{k}}
			m.assigns[k] = append(m.assigns[k], o)
			prev := m.offers[a.BatchID]
			prev.worker = w
			prev.jobs = append(prev.jobs, k)
			m.offers[a.BatchID] = prev
		}
	case strings.HasPrefix(subj, "_INBOX.dispatcher."):
		var r schemas.AssignmentReplyMsg
		if json.Unmarshal(msg.Data, &r) != nil || r.BatchID == "" || r.Status != schemas.AssignAccepted {
			return
		}
		for _, k := range m.offers[r.BatchID].jobs {
			for _, o := range m.assigns[k] {
				if o.worker == r.WorkerID {
					m.running[k] = o
				}
			}
		}
	case strings.HasPrefix(subj, bus.ResultsPrefix+"."):
		m.results[subj]++
	case strings.HasPrefix(subj, bus.ReplyPrefix+"."):
		var r struct {
			Type string `json:"type"`
			Text string `json:"text"`
		}
		if json.Unmarshal(msg.Data, &r) == nil && r.Type == "result" {
			m.terminals[subj] = append(m.terminals[subj], r.Text)
		}
	}
}

// runningOn is the worker that accepted the job's latest assignment, if no
// record was written since.
func (m *attackMonitor) runningOn(key string) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	tenant, id, _ := strings.Cut(key, "/")
	if m.results[bus.ResultSubject(tenant, id)] > 0 {
		return ""
	}
	return m.running[key].worker
}

func (m *attackMonitor) attemptOf(key string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.running[key].attempt
}

func (m *attackMonitor) maxAttempt(key string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, o := range m.assigns[key] {
		n = max(n, o.attempt)
	}
	return n
}

// ranOn reports whether the job was offered to worker at that attempt.
func (m *attackMonitor) ranOn(key, worker string, attempt int) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, o := range m.assigns[key] {
		if o.worker == worker && o.attempt == attempt {
			return true
		}
	}
	return false
}

func (m *attackMonitor) resultWritten(tenant, id string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.results[bus.ResultSubject(tenant, id)] > 0
}

// honestTerminals counts the terminal events on a reply subject that no
// attacker wrote (the attacks mark theirs PWNED).
func (m *attackMonitor) honestTerminals(subj string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, text := range m.terminals[subj] {
		if !strings.Contains(text, "PWNED") {
			n++
		}
	}
	return n
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// hugeJSON is a JSON object of about n bytes: schema-breaking by size alone.
func hugeJSON(n int) []byte {
	return mustJSON(map[string]string{"type": "result", "job_id": "bq0", "text": strings.Repeat("P", n)})
}
