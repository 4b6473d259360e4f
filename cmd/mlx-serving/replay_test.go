package main

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// The tests below build, on a real embedded JetStream, each state a replay
// killed between its steps (purge the record, queue the job, delete the dead
// letter) leaves, and check that running replay again finishes the job: one
// JOBS message or none, never a purged newer record, no dead letter left.

const replayTenant = "acme"

var t0 = time.Date(2026, 11, 1, 10, 0, 0, 123456789, time.UTC)

func replayJobReq(id string) schemas.JobRequest {
	return schemas.JobRequest{ID: id, Model: "m", Prompt: "p", Tenant: replayTenant, Priority: schemas.PriorityNormal}
}

// deadLetter stores a dead letter for job, dead at deadAt, as the dispatcher does.
func deadLetter(t *testing.T, js jetstream.JetStream, job schemas.JobRequest, attempts int, deadAt time.Time) {
	t.Helper()
	rec := schemas.DLQRecordMsg{Job: job, Reason: schemas.CodeAttemptsExhausted, Attempts: attempts,
		LastError: schemas.ErrorInfo{Code: schemas.CodeAttemptsExhausted, Message: "boom"}, DeadAt: deadAt, DispatcherID: "d1"}
	data, err := json.Marshal(rec)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(testenv.Context(t, 10*time.Second), subjects.DLQ(job.Tenant, job.ID), data); err != nil {
		t.Fatal(err)
	}
}

// terminal stores job's terminal record, finished at at.
func terminal(t *testing.T, js jetstream.JetStream, job schemas.JobRequest, status string, at time.Time) {
	t.Helper()
	res := &schemas.ResultMsg{Type: "result", JobID: job.ID, Attempt: 3, Status: status, Tenant: job.Tenant, FinishedAt: at}
	if status == schemas.StatusFailed {
		res.Error = &schemas.ErrorInfo{Code: schemas.CodeAttemptsExhausted, Message: "boom"}
	} else {
		res.FinishReason = "stop"
	}
	if err := results.Record(testenv.Context(t, 10*time.Second), js, res); err != nil {
		t.Fatal(err)
	}
}

// queued puts job in JOBS at priority, as an interrupted replay left it.
func queued(t *testing.T, js jetstream.JetStream, job schemas.JobRequest, priority string) {
	t.Helper()
	data, _ := json.Marshal(job)
	if _, err := js.Publish(testenv.Context(t, 10*time.Second), subjects.Job(job.Tenant, priority, job.ID), data); err != nil {
		t.Fatal(err)
	}
}

// requeued puts job in JOBS as replaying its dead letter (attempts, deadAt)
// does: what a replay killed after its requeue left.
func requeued(t *testing.T, js jetstream.JetStream, job schemas.JobRequest, attempts int, deadAt time.Time) {
	t.Helper()
	msg, err := requeueMsg(&schemas.DLQRecordMsg{Job: job, Attempts: attempts, DeadAt: deadAt}, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.PublishMsg(testenv.Context(t, 10*time.Second), msg); err != nil {
		t.Fatal(err)
	}
}

// count is how many messages stream holds on subject (a wildcard may be given).
func count(t *testing.T, js jetstream.JetStream, stream, subject string) uint64 {
	t.Helper()
	ctx := testenv.Context(t, 10*time.Second)
	s, err := js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(subject))
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, c := range info.State.Subjects {
		n += c
	}
	return n
}

// storedAt is the finished_at of job's record in RESULTS; zero when none.
func storedAt(t *testing.T, js jetstream.JetStream, job schemas.JobRequest) time.Time {
	t.Helper()
	r, err := results.Fetch(testenv.Context(t, 10*time.Second), js, job.Tenant, job.ID)
	if errors.Is(err, results.ErrNoResult) {
		return time.Time{}
	}
	if err != nil {
		t.Fatal(err)
	}
	return r.FinishedAt
}

type replayRun struct {
	n, failed int
	outcomes  map[string]replayOutcome
}

func runReplay(t *testing.T, js jetstream.JetStream, f replayFilter) replayRun {
	t.Helper()
	r := replayRun{outcomes: map[string]replayOutcome{}}
	var err error
	r.n, r.failed, err = replayDLQ(context.Background(), js, f, false, false, func(rec *schemas.DLQRecordMsg, o replayOutcome, err error) {
		if _, seen := r.outcomes[rec.Job.ID]; seen {
			t.Errorf("job %s replayed twice in one run", rec.Job.ID)
		}
		r.outcomes[rec.Job.ID] = o
		if (o == replayFailed || o == replayEnding || o == replayPastDeadline) != (err != nil) {
			t.Errorf("job %s: outcome %d with error %v", rec.Job.ID, o, err)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// after checks one job's end state: jobs messages in JOBS, no dead letter, and
// the record in RESULTS (zero: none).
func after(t *testing.T, js jetstream.JetStream, job schemas.JobRequest, jobs uint64, record time.Time) {
	t.Helper()
	if n := count(t, js, subjects.StreamJobs, subjects.JobAnyPriority(job.Tenant, job.ID)); n != jobs {
		t.Errorf("%s: %d JOBS messages, want %d", job.ID, n, jobs)
	}
	if n := count(t, js, subjects.StreamDLQ, subjects.DLQ(job.Tenant, job.ID)); n != 0 {
		t.Errorf("%s: %d dead letters left", job.ID, n)
	}
	if got := storedAt(t, js, job); !got.Equal(record) {
		t.Errorf("%s: RESULTS holds the record finished %v, want %v", job.ID, got, record)
	}
}

// TestReplayFinishesAfterACrash: every state a replay killed mid-job leaves is
// finished by the next replay, and a job with a newer record than its dead
// letter is never purged nor queued again.
// Mutations caught: purging without comparing the record (if false in place of
// the finished_at check: "newer" and "stale" are purged and queued again);
// deleting only the dead letter read (DeleteMsg(seq) in dropDeadLetters: a
// stale letter stays); dropping the any-priority expectation ("other-prio" is
// queued twice); a refused requeue taken as failure ("purged-queued" fails);
// heldByReplay ignored ("ending" and "other-prio" lose their letters); every
// letter replayed, not the newest only ("stale" handled twice).
func TestReplayFinishesAfterACrash(t *testing.T) {
	b := testenv.StartBus(t, jsprov.Options{})
	js := b.JS

	// A fresh dead letter: record purged, job queued, letter gone.
	fresh := replayJobReq("fresh")
	deadLetter(t, js, fresh, 3, t0)
	terminal(t, js, fresh, schemas.StatusFailed, t0)

	// Killed after the purge: {DLQ} only.
	purged := replayJobReq("purged")
	deadLetter(t, js, purged, 3, t0)

	// Killed after queuing: {DLQ, JOBS}, the record purged. The old replay
	// stopped here for good ("maximum messages per subject exceeded").
	purgedQueued := replayJobReq("purged-queued")
	deadLetter(t, js, purgedQueued, 3, t0)
	requeued(t, js, purgedQueued, 3, t0)

	// JOBS holds the job's original message: its dispatcher wrote the dead
	// letter and not yet the record. The letter must stay (the record comes).
	ending := replayJobReq("ending")
	deadLetter(t, js, ending, 3, t0)
	queued(t, js, ending, schemas.PriorityNormal)

	// The job is in JOBS at another priority (a raw publisher's copy): not
	// queued again, the letter kept.
	otherPrio := replayJobReq("other-prio")
	deadLetter(t, js, otherPrio, 3, t0)
	queued(t, js, otherPrio, schemas.PriorityHigh)

	// Killed after queuing, and the job then ran again and succeeded: the
	// dead letter is stale, the newer record must stay.
	newer := replayJobReq("newer")
	deadLetter(t, js, newer, 3, t0)
	terminal(t, js, newer, schemas.StatusCompleted, t0.Add(time.Minute))

	// Two stale dead letters and a newer success.
	stale := replayJobReq("stale")
	deadLetter(t, js, stale, 3, t0)
	deadLetter(t, js, stale, 3, t0.Add(time.Second))
	terminal(t, js, stale, schemas.StatusCompleted, t0.Add(time.Minute))

	r := runReplay(t, js, replayFilter{})
	if r.failed != 2 || r.n != 7 {
		t.Fatalf("replayed %d, failed %d (%v); want 7, 2", r.n, r.failed, r.outcomes)
	}
	want := map[string]replayOutcome{"fresh": replayRequeued, "purged": replayRequeued, "purged-queued": replayQueued,
		"ending": replayEnding, "other-prio": replayEnding, "newer": replayStale, "stale": replayStale}
	for id, o := range want {
		if r.outcomes[id] != o {
			t.Errorf("%s: outcome %d, want %d", id, r.outcomes[id], o)
		}
	}
	after(t, js, fresh, 1, time.Time{})
	after(t, js, purged, 1, time.Time{})
	after(t, js, purgedQueued, 1, time.Time{})
	after(t, js, newer, 0, t0.Add(time.Minute))
	after(t, js, stale, 0, t0.Add(time.Minute))
	for _, job := range []schemas.JobRequest{ending, otherPrio} {
		if n := count(t, js, subjects.StreamJobs, subjects.JobAnyPriority(job.Tenant, job.ID)); n != 1 {
			t.Errorf("%s: %d JOBS messages, want 1", job.ID, n)
		}
		if n := count(t, js, subjects.StreamDLQ, subjects.DLQ(job.Tenant, job.ID)); n != 1 {
			t.Errorf("%s: %d dead letters, want 1 (kept)", job.ID, n)
		}
	}

	// The dispatcher ends "ending" (record stored, message acked): now the
	// letter is replayed. Nothing else changes.
	ctx := testenv.Context(t, 10*time.Second)
	jobs, err := js.Stream(ctx, subjects.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	if err := jobs.Purge(ctx, jetstream.WithPurgeSubject(subjects.JobAnyPriority(ending.Tenant, ending.ID))); err != nil {
		t.Fatal(err)
	}
	terminal(t, js, ending, schemas.StatusFailed, t0)
	r = runReplay(t, js, replayFilter{})
	if r.n != 2 || r.failed != 1 || r.outcomes["ending"] != replayRequeued {
		t.Fatalf("second run replayed %d, failed %d, outcomes %v", r.n, r.failed, r.outcomes)
	}
	after(t, js, ending, 1, time.Time{})
	after(t, js, fresh, 1, time.Time{})
	after(t, js, newer, 0, t0.Add(time.Minute))
}

// TestReplayTakesTheNewestDeadLetter: a job dead-lettered twice (replayed, died
// again) is replayed once, from its newest letter, whose record it purges; both
// letters go. The old replay took the stale letter first, purged the newer
// record on its behalf, and failed on the second letter.
// Mutation caught: DeleteMsg(seq) in dropDeadLetters (the stale letter stays).
func TestReplayTakesTheNewestDeadLetter(t *testing.T) {
	b := testenv.StartBus(t, jsprov.Options{})
	js := b.JS
	job := replayJobReq("twice")
	deadLetter(t, js, job, 3, t0)
	deadLetter(t, js, job, 6, t0.Add(time.Minute))
	terminal(t, js, job, schemas.StatusFailed, t0.Add(time.Minute))

	r := runReplay(t, js, replayFilter{ids: map[string]bool{"twice": true}})
	if r.n != 1 || r.failed != 0 || r.outcomes["twice"] != replayRequeued {
		t.Fatalf("replayed %d, failed %d, outcomes %v", r.n, r.failed, r.outcomes)
	}
	after(t, js, job, 1, time.Time{})
	// Queued with the newest letter's attempts as its base.
	ctx := testenv.Context(t, 10*time.Second)
	s, err := js.Stream(ctx, subjects.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	m, err := s.GetLastMsgForSubject(ctx, subjects.Job(job.Tenant, schemas.PriorityNormal, job.ID))
	if err != nil {
		t.Fatal(err)
	}
	var got schemas.JobRequest
	if err := json.Unmarshal(m.Data, &got); err != nil {
		t.Fatal(err)
	}
	if got.Metadata[schemas.MetadataAttemptBase] != "6" {
		t.Errorf("attempt base %q, want 6", got.Metadata[schemas.MetadataAttemptBase])
	}
}

// TestReplayGoesOnPastAFailure: a job that cannot be queued, or a dead letter
// that cannot be read, is reported and kept; the jobs after it are still replayed, and the run
// counts the failure (the command then exits non-zero).
// Mutation caught: returning at the first failed job (the later job stays in
// the DLQ).
func TestReplayGoesOnPastAFailure(t *testing.T) {
	b := testenv.StartBus(t, jsprov.Options{})
	js := b.JS
	// A priority JOBS has no subject for: the publish finds no stream.
	bad := replayJobReq("bad")
	bad.Priority = "urgent"
	deadLetter(t, js, bad, 3, t0)
	// A dead letter replay cannot read.
	if _, err := js.Publish(testenv.Context(t, 10*time.Second), subjects.DLQ(replayTenant, "garbled"), []byte("{not json")); err != nil {
		t.Fatal(err)
	}
	good := replayJobReq("good")
	deadLetter(t, js, good, 3, t0)
	terminal(t, js, good, schemas.StatusFailed, t0)

	r := runReplay(t, js, replayFilter{})
	if r.n != 3 || r.failed != 2 || r.outcomes["bad"] != replayFailed || r.outcomes["garbled"] != replayFailed || r.outcomes["good"] != replayRequeued {
		t.Fatalf("replayed %d, failed %d, outcomes %v", r.n, r.failed, r.outcomes)
	}
	after(t, js, good, 1, time.Time{})
	if n := count(t, js, subjects.StreamDLQ, subjects.DLQ(bad.Tenant, bad.ID)); n != 1 {
		t.Errorf("the failed job's dead letter: %d left, want 1 (kept for a re-run)", n)
	}
}

// TestReplayCommandExitsNonZeroAfterAFailure: the command replays what it can,
// names the job that failed and exits non-zero at the end.
// Mutation caught: returning 0 whatever failed (the exit code goes red).
func TestReplayCommandExitsNonZeroAfterAFailure(t *testing.T) {
	t.Setenv("MLX_SERVING_CONFIG", "")
	b := testenv.StartBus(t, jsprov.Options{})
	bad := replayJobReq("bad")
	bad.Priority = "urgent"
	deadLetter(t, b.JS, bad, 3, t0)
	good := replayJobReq("good")
	deadLetter(t, b.JS, good, 3, t0)

	code, out, stderr := runReal(t, "replay", "--nats", b.Server.ClientURL())
	if code != exitFailed || !strings.Contains(out, "replayed good") || !strings.Contains(stderr, "bad:") {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, out, stderr)
	}
	after(t, b.JS, good, 1, time.Time{})
}
