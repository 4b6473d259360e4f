package main

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A live dispatcher ends a dead job in three steps: the dead letter, the
// record, the ack of its JOBS message (dispatcher/terminal.go). The tests below
// run replay between them, on a real embedded JetStream (red team R3-6).

// ackJob removes job's JOBS message, as its dispatcher's ack does.
func ackJob(t *testing.T, js jetstream.JetStream, job schemas.JobRequest) {
	t.Helper()
	ctx := testenv.Context(t, 10*time.Second)
	jobs, err := js.Stream(ctx, subjects.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	if err := jobs.Purge(ctx, jetstream.WithPurgeSubject(subjects.JobAnyPriority(job.Tenant, job.ID))); err != nil {
		t.Fatal(err)
	}
}

// TestReplayWaitsForTheRecordsAck: replay run after the letter and the record,
// before the ack, must leave both. The old replay purged the record, was
// refused the requeue (the original still queued), and the ack then left a
// dead letter with neither record nor queued job.
// Mutation caught: replayJob without the JOBS check before RESULTS is read
// (the record is purged).
func TestReplayWaitsForTheRecordsAck(t *testing.T) {
	b := testenv.StartBus(t, jsprov.Options{})
	js := b.JS
	job := replayJobReq("acking")
	queued(t, js, job, schemas.PriorityNormal)
	deadLetter(t, js, job, 3, t0)
	terminal(t, js, job, schemas.StatusFailed, t0)

	r := runReplay(t, js, replayFilter{})
	if r.n != 1 || r.failed != 1 || r.outcomes[job.ID] != replayEnding {
		t.Fatalf("replayed %d, failed %d, outcomes %v; want the job still ending", r.n, r.failed, r.outcomes)
	}
	ackJob(t, js, job)
	if got := storedAt(t, js, job); !got.Equal(t0) {
		t.Fatalf("the record after the race: finished %v, want %v (kept)", got, t0)
	}
	if n := count(t, js, subjects.StreamDLQ, subjects.DLQ(job.Tenant, job.ID)); n != 1 {
		t.Fatalf("%d dead letters after the race, want 1 (kept)", n)
	}
	// Once acked, the next replay does the job.
	r = runReplay(t, js, replayFilter{})
	if r.failed != 0 || r.outcomes[job.ID] != replayRequeued {
		t.Fatalf("after the ack: failed %d, outcomes %v", r.failed, r.outcomes)
	}
	after(t, js, job, 1, time.Time{})
}

// racingJS runs before ahead of the first requeue (PublishMsg) replay sends,
// and with refuse set answers that requeue with a timeout, unsent.
type racingJS struct {
	jetstream.JetStream
	before func()
	refuse bool
}

func (r *racingJS) PublishMsg(ctx context.Context, m *nats.Msg, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	if r.before != nil {
		r.before()
		r.before = nil
		if r.refuse {
			return nil, context.DeadlineExceeded
		}
	}
	return r.JetStream.PublishMsg(ctx, m, opts...)
}

// TestReplayDoesNotQueueAJobEndingMeanwhile: replay run after the letter,
// before the record; the dispatcher stores the record and acks while replay
// is between reading RESULTS (nothing yet) and its requeue. The old replay's
// requeue was then accepted, a dispatcher acked that copy unrun (its record
// exists), and replay dropped the letter: "replayed", never run, letter lost.
// Mutation caught: replayJob without the JOBS check before RESULTS is read
// (the requeue goes through and the letter is dropped).
func TestReplayDoesNotQueueAJobEndingMeanwhile(t *testing.T) {
	b := testenv.StartBus(t, jsprov.Options{})
	job := replayJobReq("ending-meanwhile")
	queued(t, b.JS, job, schemas.PriorityNormal)
	deadLetter(t, b.JS, job, 3, t0)
	js := &racingJS{JetStream: b.JS, before: func() {
		terminal(t, b.JS, job, schemas.StatusFailed, t0)
		ackJob(t, b.JS, job)
	}}

	r := runReplay(t, js, replayFilter{})
	if r.n != 1 || r.failed != 1 || r.outcomes[job.ID] != replayEnding {
		t.Fatalf("replayed %d, failed %d, outcomes %v; want the job still ending", r.n, r.failed, r.outcomes)
	}
	if n := count(t, b.JS, subjects.StreamDLQ, subjects.DLQ(job.Tenant, job.ID)); n != 1 {
		t.Fatalf("%d dead letters, want 1 (kept)", n)
	}
	if n := count(t, b.JS, subjects.StreamJobs, subjects.JobAnyPriority(job.Tenant, job.ID)); n != 1 {
		t.Fatalf("%d JOBS messages, want the original's 1", n)
	}
}

// takenStream is the DLQ stream of a replay that races another: right after
// this replay reads the dead letter at seq, the other one takes the job and
// drops its letters.
type takenStream struct {
	jetstream.Stream
	seq  uint64
	take func()
}

func (s *takenStream) GetMsg(ctx context.Context, seq uint64, opts ...jetstream.GetMsgOpt) (*jetstream.RawStreamMsg, error) {
	m, err := s.Stream.GetMsg(ctx, seq, opts...)
	if seq == s.seq && s.take != nil {
		s.take()
		s.take = nil
	}
	return m, err
}

// takenJS hands replay the racing DLQ stream.
type takenJS struct {
	jetstream.JetStream
	dlq *takenStream
}

func (j *takenJS) Stream(ctx context.Context, name string) (jetstream.Stream, error) {
	s, err := j.JetStream.Stream(ctx, name)
	if err != nil || name != subjects.StreamDLQ {
		return s, err
	}
	j.dlq.Stream = s
	return j.dlq, nil
}

// TestReplayGoesOnPastALetterAnotherReplayTook: three replays run at once (red
// team rt7): one read a letter, another took the job and dropped its letters,
// and the first aborted on "message not found" looking for the job's newest
// letter, exit 1, the jobs after it not replayed.
// Mutation caught: GetLastMsgForSubject's ErrMsgNotFound returned as an error
// (runReplay fails on it).
func TestReplayGoesOnPastALetterAnotherReplayTook(t *testing.T) {
	b := testenv.StartBus(t, jsprov.Options{})
	taken, next := replayJobReq("taken"), replayJobReq("next")
	deadLetter(t, b.JS, taken, 3, t0)
	deadLetter(t, b.JS, next, 3, t0)
	js := &takenJS{JetStream: b.JS, dlq: &takenStream{seq: 1, take: func() {
		// The other replay's last step for the job (dropDeadLetters).
		ctx := testenv.Context(t, 10*time.Second)
		dlq, err := b.JS.Stream(ctx, subjects.StreamDLQ)
		if err != nil {
			t.Fatal(err)
		}
		if err := dlq.Purge(ctx, jetstream.WithPurgeSubject(subjects.DLQ(taken.Tenant, taken.ID))); err != nil {
			t.Fatal(err)
		}
	}}}

	r := runReplay(t, js, replayFilter{})
	if r.n != 1 || r.failed != 0 || r.outcomes[next.ID] != replayRequeued {
		t.Fatalf("replayed %d, failed %d, outcomes %v; want only %q, requeued", r.n, r.failed, r.outcomes, next.ID)
	}
	if _, seen := r.outcomes[taken.ID]; seen {
		t.Errorf("the job the other replay took was reported here too: %v", r.outcomes[taken.ID])
	}
	after(t, b.JS, next, 1, time.Time{})
}

// A requeue refused after the purge, while a concurrent replay's run of the
// job ended with a newer record: the old record cannot go back, and the job
// has its one record, so this letter is stale and goes. Before, it stayed
// ("run replay again: it queues the job"), a second letter for a finished job
// (red team round 21, two replays racing a NATS kill).
// Mutation caught: restoreAfterRefusal without the ErrResultExists case:
// failed, letter kept: red.
func TestReplayRefusedAfterANewerRecordDropsTheLetter(t *testing.T) {
	b := testenv.StartBus(t, jsprov.Options{})
	job := replayJobReq("newer-meanwhile")
	deadLetter(t, b.JS, job, 3, t0)
	terminal(t, b.JS, job, schemas.StatusFailed, t0)
	newer := t0.Add(time.Hour)
	js := &racingJS{JetStream: b.JS, refuse: true, before: func() { terminal(t, b.JS, job, schemas.StatusCompleted, newer) }}

	r := runReplay(t, js, replayFilter{})
	if r.outcomes[job.ID] != replayStale || r.failed != 0 {
		t.Fatalf("failed %d, outcomes %v; want stale", r.failed, r.outcomes)
	}
	after(t, b.JS, job, 0, newer)
}
