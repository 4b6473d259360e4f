package worker

import (
	"encoding/json"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A completed record whose dispatcher is gone (no responder on its done
// subject) is offered on the worker's adoption subject with the assignment's
// placement token, and not reported for a retry once a dispatcher stored it;
// a failed one, or one without a token, is reported as before.
// Mutations caught: finish without the adopt call (nothing offered, a report
// sent); adopt without the header (the token missing).
func TestRecordOfAGoneDispatcherIsOfferedForAdoption(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	cfg := testConfig(t, b, "w-adopt")
	cfg.ResultTimeout = 2 * time.Second
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.nc, a.mark = b.nc, b.nc.NewInbox() // what Start sets; this test needs no runtime
	offers := make(chan *nats.Msg, 4)
	if _, err := b.nc.Subscribe(subjects.Adopt(cfg.WorkerID), func(m *nats.Msg) {
		offers <- m
		data, _ := json.Marshal(schemas.FinishReplyMsg{Status: schemas.FinishStored})
		_ = m.Respond(data)
	}); err != nil {
		t.Fatal(err)
	}
	reports, err := b.nc.SubscribeSync(subjects.Attempt(cfg.WorkerID))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	token := "1800000000.00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
	record := func(id, status string) *schemas.ResultMsg {
		res := &schemas.ResultMsg{Type: "result", JobID: id, Tenant: "acme", Attempt: 1, Seq: 3, Status: status, Text: "done",
			Usage: schemas.Usage{CompletionTokens: 3, TotalTokens: 3}, Model: "tiny", WorkerID: cfg.WorkerID, FinishedAt: time.Now().UTC()}
		if status == schemas.StatusCompleted {
			res.FinishReason = schemas.FinishStop
		} else {
			res.Error = &schemas.ErrorInfo{Code: schemas.CodeGenerationFailed, Message: "x"}
		}
		return res
	}

	a.finish(t.Context(), record("j-done", schemas.StatusCompleted), "gone-dispatcher", token)
	select {
	case m := <-offers:
		var res schemas.ResultMsg
		if err := json.Unmarshal(m.Data, &res); err != nil || res.JobID != "j-done" || res.Status != schemas.StatusCompleted {
			t.Fatalf("offered %s (%v), want j-done's completed record", m.Data, err)
		}
		if got := m.Header.Get(subjects.HeaderPlacement); got != token {
			t.Fatalf("offered with placement %q, want %q", got, token)
		}
	default:
		t.Fatal("the completed record was not offered for adoption")
	}
	if m, err := reports.NextMsg(100 * time.Millisecond); err == nil {
		t.Fatalf("an adopted record's attempt was reported too: %s", m.Data)
	}

	// Not offered: a failed record (its retry or failure is the dispatcher's
	// call) and a record without a token (an assignment from before adoption).
	for _, c := range []struct {
		res   *schemas.ResultMsg
		token string
	}{{record("j-failed", schemas.StatusFailed), token}, {record("j-untokened", schemas.StatusCompleted), ""}} {
		a.finish(t.Context(), c.res, "gone-dispatcher", c.token)
		if _, err := reports.NextMsg(10 * time.Second); err != nil {
			t.Fatalf("%s: no attempt report: %v", c.res.JobID, err)
		}
		select {
		case m := <-offers:
			t.Fatalf("%s was offered for adoption: %s", c.res.JobID, m.Data)
		default:
		}
	}
}

// A dispatcher that holds its done subject but never answers (hung, or a dead
// connection the server has not noticed yet) gets the same as a gone one: the
// completed record is offered for adoption once the hand-over has had no
// answer for adoptAfter (one try). Before, only no-responders led there, and
// the job ran again after its ack wait; then adoption came only after the
// ResultTimeout, after the job's redelivery (red team round 18, operator F2).
// Mutations caught: handOverUnanswered without its timeout cases (nothing
// offered; the attempt reported); no adoptAfter (offered after 30 s).
func TestRecordOfAHungDispatcherIsOfferedForAdoption(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	cfg := testConfig(t, b, "w-hung")
	cfg.ResultTimeout = 30 * time.Second // the default: adoption comes after adoptAfter, long before it
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.nc, a.mark = b.nc, b.nc.NewInbox()
	handedOver := make(chan struct{}, 16)
	if _, err := b.nc.Subscribe(subjects.Done(cfg.WorkerID, "hung-dispatcher"), func(*nats.Msg) {
		handedOver <- struct{}{} // taken, never answered
	}); err != nil {
		t.Fatal(err)
	}
	offers := make(chan *nats.Msg, 4)
	if _, err := b.nc.Subscribe(subjects.Adopt(cfg.WorkerID), func(m *nats.Msg) {
		offers <- m
		data, _ := json.Marshal(schemas.FinishReplyMsg{Status: schemas.FinishStored})
		_ = m.Respond(data)
	}); err != nil {
		t.Fatal(err)
	}
	reports, err := b.nc.SubscribeSync(subjects.Attempt(cfg.WorkerID))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	res := &schemas.ResultMsg{Type: "result", JobID: "j-hung", Tenant: "acme", Attempt: 1, Seq: 3, Status: schemas.StatusCompleted,
		FinishReason: schemas.FinishStop, Text: "done", Usage: schemas.Usage{CompletionTokens: 3, TotalTokens: 3}, Model: "tiny",
		WorkerID: cfg.WorkerID, FinishedAt: time.Now().UTC()}
	start := time.Now()
	a.finish(t.Context(), res, "hung-dispatcher", "1800000000.00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
	if took := time.Since(start); took > cfg.ResultTimeout/2 {
		t.Errorf("adopted after %v: the hand-over was tried for its whole ResultTimeout (%v) first", took, cfg.ResultTimeout)
	}
	select {
	case <-handedOver:
	default:
		t.Fatal("the record was never handed to its dispatcher")
	}
	select {
	case m := <-offers:
		if got := m.Header.Get(subjects.HeaderPlacement); got == "" {
			t.Fatal("offered without its placement token")
		}
	default:
		t.Fatal("the completed record of a dispatcher that did not answer was not offered for adoption")
	}
	if m, err := reports.NextMsg(100 * time.Millisecond); err == nil {
		t.Fatalf("an adopted record's attempt was reported too: %s", m.Data)
	}
}

// A completed record whose dispatcher is paused (SIGSTOP, a frozen network
// path) for longer than a hand-over and an adoption took before is still
// offered, by turns to its dispatcher and for adoption, until one answers:
// reported handover_failed after a minute, the report was handled first by
// the resumed dispatcher, which ended the job attempts_exhausted (red team
// round 18, operator F1).
// Mutation caught: adopt trying only the adoption subject (the paused
// dispatcher's answer never read: reported after AdoptPatience).
func TestRecordOfAPausedDispatcherIsOfferedUntilItAnswers(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	cfg := testConfig(t, b, "w-paused")
	cfg.ResultTimeout, cfg.AdoptPatience = time.Second, 20*time.Second
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.nc, a.mark = b.nc, b.nc.NewInbox()
	// Paused for 4 s, well past the ResultTimeout of a hand-over and of an
	// adoption together (2 s), after which the report went out before.
	resumeAt := time.Now().Add(4 * time.Second)
	var answered atomic.Bool
	if _, err := b.nc.Subscribe(subjects.Done(cfg.WorkerID, "paused-dispatcher"), func(m *nats.Msg) {
		if time.Now().Before(resumeAt) {
			return
		}
		answered.Store(true)
		data, _ := json.Marshal(schemas.FinishReplyMsg{Status: schemas.FinishStored})
		_ = m.Respond(data)
	}); err != nil {
		t.Fatal(err)
	}
	reports, err := b.nc.SubscribeSync(subjects.Attempt(cfg.WorkerID))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	res := &schemas.ResultMsg{Type: "result", JobID: "j-paused", Tenant: "acme", Attempt: 1, Seq: 3, Status: schemas.StatusCompleted,
		FinishReason: schemas.FinishStop, Text: "done", Usage: schemas.Usage{CompletionTokens: 3, TotalTokens: 3}, Model: "tiny",
		WorkerID: cfg.WorkerID, FinishedAt: time.Now().UTC()}
	a.finish(t.Context(), res, "paused-dispatcher", "1800000000.00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
	if !answered.Load() {
		t.Fatal("finish returned before the resumed dispatcher answered")
	}
	if m, err := reports.NextMsg(100 * time.Millisecond); err == nil {
		t.Fatalf("the attempt was reported although its record was stored: %s", m.Data)
	}
}

// A busy answer (the dispatcher had as many of this worker's requests waiting
// as it holds jobs on it, and read none of this one) is tried again: taken
// as final, it dropped a completed record whose dispatcher was catching up on
// the worker's stale tries (red team round 18, second pass, F1).
// Mutation caught: finish without the FinishBusy case (the record dropped
// after the first answer).
func TestBusyAnswerIsTriedAgain(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	cfg := testConfig(t, b, "w-busy")
	cfg.ResultTimeout = 10 * time.Second
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.nc, a.mark = b.nc, b.nc.NewInbox()
	var tries atomic.Int32
	if _, err := b.nc.Subscribe(subjects.Done(cfg.WorkerID, "d-busy"), func(m *nats.Msg) {
		reply := schemas.FinishReplyMsg{Status: schemas.FinishBusy}
		if tries.Add(1) > 2 {
			reply = schemas.FinishReplyMsg{JobID: "j-busy", Status: schemas.FinishStored}
		}
		data, _ := json.Marshal(reply)
		_ = m.Respond(data)
	}); err != nil {
		t.Fatal(err)
	}
	reports, err := b.nc.SubscribeSync(subjects.Attempt(cfg.WorkerID))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	res := &schemas.ResultMsg{Type: "result", JobID: "j-busy", Tenant: "acme", Attempt: 1, Seq: 3, Status: schemas.StatusCompleted,
		FinishReason: schemas.FinishStop, Text: "done", Usage: schemas.Usage{CompletionTokens: 3, TotalTokens: 3}, Model: "tiny",
		WorkerID: cfg.WorkerID, FinishedAt: time.Now().UTC()}
	a.finish(t.Context(), res, "d-busy", "")
	if n := tries.Load(); n != 3 {
		t.Fatalf("handed over %d times, want 3 (two busy answers, then stored)", n)
	}
	if m, err := reports.NextMsg(100 * time.Millisecond); err == nil {
		t.Fatalf("the attempt was reported although its record was stored: %s", m.Data)
	}
}

// A worker told to stop now (Shutdown, a second signal) does not hold a
// record for AdoptPatience: after its current try it reports the attempt.
// Mutation caught: unlessHurried not ending the tries (finish runs for the
// whole minute).
func TestHurriedWorkerReportsInsteadOfOffering(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	cfg := testConfig(t, b, "w-hurried")
	cfg.ResultTimeout, cfg.AdoptPatience = time.Second, time.Minute
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.nc, a.mark = b.nc, b.nc.NewInbox()
	reports, err := b.nc.SubscribeSync(subjects.Attempt(cfg.WorkerID))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	a.hurryOnce.Do(func() { close(a.hurry) })
	res := &schemas.ResultMsg{Type: "result", JobID: "j-hurried", Tenant: "acme", Attempt: 1, Seq: 3, Status: schemas.StatusCompleted,
		FinishReason: schemas.FinishStop, Text: "done", Usage: schemas.Usage{CompletionTokens: 3, TotalTokens: 3}, Model: "tiny",
		WorkerID: cfg.WorkerID, FinishedAt: time.Now().UTC()}
	start := time.Now()
	a.finish(t.Context(), res, "gone-dispatcher", "1800000000.00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
	if took := time.Since(start); took > cfg.AdoptPatience/2 {
		t.Errorf("a hurried worker held its record for %v", took)
	}
	if _, err := reports.NextMsg(5 * time.Second); err != nil {
		t.Fatalf("no attempt report from a hurried worker: %v", err)
	}
}
