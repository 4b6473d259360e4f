package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go"
)

// TestFullDLQJobsStillEndOnce: a tenant flooding the DLQ with dead jobs (red
// team R3-3: jobs for a model nobody announced are dead-lettered at once,
// each letter the whole job) stops at the DLQ's byte bound, and every job
// still ends with exactly one terminal record and is acked: a letter the DLQ
// refuses (full) is dropped and counted, never naked into a loop; a job too
// large for any assignment fails at intake and leaves no letter. Runs on a real embedded server with a 64 KiB max payload
// and a 256 KiB DLQ.
// Mutations caught: storeDeadLetter returning the refusal instead of nil (the
// jobs are naked over and over and never get a record); the DLQ without
// MaxBytes (it grows past its bound).
func TestFullDLQJobsStillEndOnce(t *testing.T) {
	t.Parallel()
	const (
		maxPayload = 64 << 10
		dlqBytes   = 256 << 10
		ghosts     = 40 // ~16 KiB letters: 2.5 times the bound
	)
	e := newEnvWith(t, natsserver.Options{MaxPayload: maxPayload}, jsprov.Options{DLQMaxBytes: dlqBytes})
	e.startWorker("w1", 2, []string{"m"}, nil)
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))

	// First a job just under the max payload: no assignment could carry it,
	// so it fails at intake (assignsize.go) and leaves no letter (its letter,
	// the job and more, could not be published either).
	big := newJob("too-large", "ghost", "normal")
	big.Prompt = "x"
	base, _ := json.Marshal(big)
	big.Prompt = strings.Repeat("x", maxPayload-len(base)-64)
	e.mustSubmit(big)
	if r := e.waitResult(big.ID, 30*time.Second); r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != schemas.CodeInvalidRequest {
		t.Fatalf("too-large: %+v err %+v, want failed %s", r, r.Error, schemas.CodeInvalidRequest)
	}
	var ids []string
	for i := range ghosts {
		j := newJob(fmt.Sprintf("ghost-%02d", i), "ghost", "normal")
		j.Prompt = strings.Repeat("p", 16<<10)
		e.mustSubmit(j)
		ids = append(ids, j.ID)
	}
	for _, id := range ids {
		r := e.waitResult(id, 30*time.Second)
		if r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != schemas.CodeModelNotAvailable {
			t.Fatalf("%s: %+v err %+v", id, r, r.Error)
		}
	}
	waitFor(t, 30*time.Second, "every job acked", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })

	if n := e.streamMsgs(subjects.StreamResults); n != uint64(len(ids)+1) {
		t.Errorf("RESULTS holds %d records, want %d (one per job)", n, len(ids)+1)
	}
	s, err := e.js.Stream(context.Background(), subjects.StreamDLQ)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Bytes > dlqBytes {
		t.Errorf("the DLQ holds %d bytes, bound %d", info.State.Bytes, dlqBytes)
	}
	if _, err := s.GetLastMsgForSubject(context.Background(), subjects.DLQ("", big.ID)); err == nil {
		t.Errorf("the too-large job's letter is in the DLQ")
	}
	// Letters stored while there was room stay (discard-new).
	if _, err := s.GetLastMsgForSubject(context.Background(), subjects.DLQ("", "ghost-00")); err != nil {
		t.Errorf("the first ghost's letter: %v", err)
	}
	refused := d.Metrics().DeadLettersRefused.Load()
	if stored := int64(info.State.Msgs); refused == 0 || stored == 0 || stored+refused != int64(len(ids)) {
		t.Errorf("%d letters stored, %d refused; want both > 0 and %d in all", stored, refused, len(ids))
	}
	if n := d.Metrics().TransitionCount(StateQueued, EvDeadLetter); n != int64(len(ids)) {
		t.Errorf("queued→dead_lettered counted %d, want %d", n, len(ids))
	}
}

// TestRawDeadLetterRefusedIsNotALoop: a message on JOBS that is no job, whose
// raw dead letter (the body base64-encoded, a third larger) exceeds the max
// payload, is terminated and counted, not naked every 5 s for ever.
// Mutation caught: the refusal treated like any other publish error (nak).
func TestRawDeadLetterRefusedIsNotALoop(t *testing.T) {
	t.Parallel()
	const maxPayload = 64 << 10
	e := newEnvWith(t, natsserver.Options{MaxPayload: maxPayload}, jsprov.Options{})
	e.startWorker("w1", 2, []string{"m"}, nil) // a dispatcher pulls only for a fleet
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	// A literal '*' names no job id: not a job.
	if _, err := e.js.Publish(context.Background(), "mlx.jobs.a.normal.*", []byte(strings.Repeat("z", maxPayload-1024))); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the message terminated", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })
	if n := d.Metrics().DeadLettersRefused.Load(); n != 1 {
		t.Fatalf("refused dead letters counted %d, want 1", n)
	}
	if n := e.streamMsgs(subjects.StreamDLQ); n != 0 {
		t.Fatalf("the DLQ holds %d messages, want 0 (the letter was too large)", n)
	}
}

// A DLQ that fails (deleted by an operator here; a DLQ without a leader alike)
// holds up only the dead jobs' own writes, never placement: another job runs
// and completes meanwhile, and once the DLQ is back the dead job gets its
// letter and its record. Tried while holding placement, one tenant's job for
// a model nobody serves stopped every tenant's jobs (red team, store outages,
// F4). Mutation caught: retryWrite raising the gate for letter failures too
// (the normal job is not placed).
func TestFailingDLQHoldsNoPlacement(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e.deleteStream(subjects.StreamDLQ)
	e.startWorker("w1", 2, []string{"m"}, nil)
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	ghost := newJob("ghost-1", "ghost", "normal")
	e.mustSubmit(ghost)
	waitFor(t, 15*time.Second, "the dead letter refused", func() bool { return d.Metrics().RecordWriteFailures.Load() > 0 })
	if r := e.waitResultAfter(newJob("normal-1", "m", "normal"), 15*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("a job while the DLQ fails: %+v", r)
	}
	if _, err := e.tenantResult("", ghost.ID); !errors.Is(err, bus.ErrNoResult) {
		t.Fatalf("the dead job has a record before its letter: %v", err)
	}
	if _, err := e.js.CreateStream(ctx, jsprov.StreamConfigs(jsprov.Options{})[subjects.StreamDLQ]); err != nil {
		t.Fatal(err)
	}
	if r := e.waitResult(ghost.ID, 15*time.Second); r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != schemas.CodeModelNotAvailable {
		t.Fatalf("the dead job: %+v", r)
	}
	s, err := e.js.Stream(ctx, subjects.StreamDLQ)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetLastMsgForSubject(ctx, subjects.DLQ("", ghost.ID)); err != nil {
		t.Fatalf("the dead job's letter: %v", err)
	}
}

// A dead letter the DLQ keeps failing is dropped after the dispatcher's
// patience, and the job ends with its record alone, counted as a refused
// letter: a DLQ that never comes back does not leave a dead job unanswered.
// Mutation caught: storeDeadLetter without its patience (no record).
func TestDeadLetterFailingPastPatienceIsDropped(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.deleteStream(subjects.StreamDLQ)
	e.startWorker("w1", 2, []string{"m"}, nil) // a fleet that does not serve "ghost"
	d, err := New(testConfig("d1", e.connect("d1")))
	if err != nil {
		t.Fatal(err)
	}
	d.letterPatience = 300 * time.Millisecond
	runNew(t, d)
	ghost := newJob("ghost-1", "ghost", "normal")
	e.mustSubmit(ghost)
	if r := e.waitResult(ghost.ID, 15*time.Second); r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != schemas.CodeModelNotAvailable {
		t.Fatalf("the dead job: %+v", r)
	}
	if n := d.Metrics().DeadLettersRefused.Load(); n != 1 {
		t.Fatalf("refused letters counted %d, want 1", n)
	}
}

// deleteStream deletes a stream, as an operator might.
func (e *testEnv) deleteStream(name string) {
	e.tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.js.DeleteStream(ctx, name); err != nil {
		e.tb.Fatal(err)
	}
}

// A DLQ that takes publishes but never answers them (a leader that does not
// respond; here a silent subscriber where the stream was) holds no placement
// either: each letter's try waits out its timeout, and the slow-try hold,
// armed for the whole try, held every tenant's placement for the letter's
// patience, ~33 s a dead letter (round 15, F2). Mutations caught: timedRecord
// around the letter's publish as well (the normal job waits past 15 s);
// retryWrite without its keep-alive timer (dead-lettered 2 or 3 times).
func TestSilentDLQHoldsNoPlacement(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.deleteStream(subjects.StreamDLQ)
	sub, err := e.nc.Subscribe(subjects.DLQ("", ">"), func(*nats.Msg) {}) // takes letters, answers none
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := e.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	e.startWorker("w1", 2, []string{"m"}, nil)
	cfg := testConfig("d1", e.connect("d1"))
	cfg.WriteGrace = 200 * time.Millisecond // the letter's write is still tried at the stop
	d, _ := runDispatcher(t, cfg)
	e.mustSubmit(newJob("ghost-1", "ghost", "normal"))
	waitFor(t, 15*time.Second, "the dead letter tried", func() bool { return d.Metrics().RecordWriteFailures.Load() > 0 })
	if r := e.waitResultAfter(newJob("normal-1", "m", "normal"), 15*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("a job while the DLQ does not answer: %+v", r)
	}
	// One delivery of the dead job, kept alive through its 5 s tries (the test
	// AckWait is 2 s): redelivered, it was dead-lettered again and again.
	if n := d.Metrics().TransitionCount(StateQueued, EvDeadLetter); n != 1 {
		t.Fatalf("the dead job was dead-lettered %d times, want 1", n)
	}
}
