package main

import (
	"context"
	"errors"
	"fmt"
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

// replayOnce replays every dead letter once and returns each job's outcome and
// error.
func replayOnce(t *testing.T, b *testenv.Bus, clearDeadline bool) (map[string]replayOutcome, map[string]error) {
	t.Helper()
	outs, errs := map[string]replayOutcome{}, map[string]error{}
	_, _, err := replayDLQ(context.Background(), b.JS, replayFilter{}, false, clearDeadline, func(rec *schemas.DLQRecordMsg, o replayOutcome, err error) {
		outs[rec.Job.ID], errs[rec.Job.ID] = o, err
	})
	if err != nil {
		t.Fatal(err)
	}
	return outs, errs
}

// A replay the queue refuses (full) puts the record it purged back and keeps
// the letter: before, the job was left with neither a record nor a queued
// message, only a letter that outlives the records (red team round 19,
// opstore F3). Once there is room, the next replay queues it.
// Mutation caught: replayJob without results.Restore (no record after the
// refused replay).
func TestReplayIntoAFullQueueKeepsTheRecord(t *testing.T) {
	b := testenv.StartBus(t, jsprov.Options{JobsMaxMsgs: 1})
	js := b.JS
	queued(t, js, replayJobReq("filler"), schemas.PriorityNormal)
	dead := replayJobReq("dead")
	deadLetter(t, js, dead, 3, t0)
	terminal(t, js, dead, schemas.StatusFailed, t0)

	outs, errs := replayOnce(t, b, false)
	if outs["dead"] != replayFailed || errs["dead"] == nil || !strings.Contains(errs["dead"].Error(), "record was put back") {
		t.Fatalf("replay into a full queue: outcome %d, error %v", outs["dead"], errs["dead"])
	}
	if got := storedAt(t, js, dead); !got.Equal(t0) {
		t.Fatalf("after the refused replay RESULTS holds the record finished %v, want the dead one's %v", got, t0)
	}
	if n := count(t, js, subjects.StreamDLQ, subjects.DLQ(dead.Tenant, dead.ID)); n != 1 {
		t.Fatalf("%d dead letters after the refused replay, want the 1 kept", n)
	}

	// Room again: the replay finishes.
	ctx := testenv.Context(t, 10*time.Second)
	jobs, err := js.Stream(ctx, subjects.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	if err := jobs.Purge(ctx); err != nil {
		t.Fatal(err)
	}
	if outs, errs = replayOnce(t, b, false); outs["dead"] != replayRequeued {
		t.Fatalf("replay with room: outcome %d, error %v", outs["dead"], errs["dead"])
	}
	after(t, js, dead, 1, time.Time{})
}

// A job whose deadline has passed, or comes within replayDeadlineMargin, is not
// replayed into an expiry that would replace its record and letter, the only
// account of why it died (red team round 19, opstore F4, and the second pass);
// --clear-deadline replays it without one.
// Mutations caught: the deadline check taken out, and a margin of 0 (the job
// is requeued, its record purged).
func TestReplayPastTheDeadlineKeepsRecordAndLetter(t *testing.T) {
	b := testenv.StartBus(t, jsprov.Options{})
	js := b.JS
	dead := replayJobReq("late")
	// Not even past: a deadline 30 s ahead would pass while the job waits.
	soon := time.Now().Add(30 * time.Second).UTC()
	dead.Deadline = &soon
	deadLetter(t, js, dead, 3, t0)
	terminal(t, js, dead, schemas.StatusFailed, t0)

	outs, errs := replayOnce(t, b, false)
	if outs["late"] != replayPastDeadline || errs["late"] == nil {
		t.Fatalf("replay past the deadline: outcome %d, error %v", outs["late"], errs["late"])
	}
	if got := storedAt(t, js, dead); !got.Equal(t0) {
		t.Fatalf("RESULTS holds the record finished %v, want the dead one's %v", got, t0)
	}
	if n := count(t, js, subjects.StreamJobs, subjects.JobAnyPriority(dead.Tenant, dead.ID)); n != 0 {
		t.Fatalf("%d JOBS messages, want none", n)
	}

	if outs, errs = replayOnce(t, b, true); outs["late"] != replayRequeued {
		t.Fatalf("replay --clear-deadline: outcome %d, error %v", outs["late"], errs["late"])
	}
	after(t, js, dead, 1, time.Time{})
	ctx := testenv.Context(t, 10*time.Second)
	jobs, err := js.Stream(ctx, subjects.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	m, err := jobs.GetLastMsgForSubject(ctx, subjects.JobAnyPriority(dead.Tenant, dead.ID))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(m.Data), `"deadline"`) {
		t.Fatalf("the job was queued with its deadline: %s", m.Data)
	}
}

// A refused requeue whose message JOBS holds after all (the publish was stored
// and only its ack lost) does not get its record put back: a record over the
// queued job made its dispatcher ack it unrun, and a later replay then
// dropped the letter (the final review of round 19).
// Mutation caught: restoreAfterRefusal restoring without looking in JOBS.
func TestRefusedRequeueThatWasStoredKeepsNoRecord(t *testing.T) {
	b := testenv.StartBus(t, jsprov.Options{})
	js := b.JS
	dead := replayJobReq("acklost")
	deadLetter(t, js, dead, 3, t0)
	requeued(t, js, dead, 3, t0) // what the "failed" publish stored
	msg, err := requeueMsg(&schemas.DLQRecordMsg{Job: dead, Attempts: 3, DeadAt: t0}, false)
	if err != nil {
		t.Fatal(err)
	}
	ctx := testenv.Context(t, 10*time.Second)
	dlq, err := js.Stream(ctx, subjects.StreamDLQ)
	if err != nil {
		t.Fatal(err)
	}
	last, err := dlq.GetLastMsgForSubject(ctx, subjects.DLQ(dead.Tenant, dead.ID))
	if err != nil {
		t.Fatal(err)
	}
	o, err := restoreAfterRefusal(ctx, js, dlq, last.Subject, last.Sequence, dead.Tenant, &dead, msg, []byte(`{"old":"record"}`), context.DeadlineExceeded)
	if o != replayRequeued || err != nil {
		t.Fatalf("outcome %d, error %v; want requeued", o, err)
	}
	after(t, js, dead, 1, time.Time{})
}

// A job an interrupted replay left without its record (purged, not queued) is
// queued whatever its deadline, so it ends with a record again: skipped for
// its deadline, it had none for good (the last review of round 19).
// Mutation caught: the deadline check before the record is read (the job is
// skipped past_deadline with no record).
func TestReplayOfAJobWithoutItsRecordIgnoresTheDeadline(t *testing.T) {
	b := testenv.StartBus(t, jsprov.Options{})
	js := b.JS
	dead := replayJobReq("norecord")
	soon := time.Now().Add(30 * time.Second).UTC()
	dead.Deadline = &soon
	deadLetter(t, js, dead, 3, t0) // the record already purged by the interrupted run
	if outs, errs := replayOnce(t, b, false); outs["norecord"] != replayRequeued {
		t.Fatalf("outcome %d, error %v; want requeued", outs["norecord"], errs["norecord"])
	}
	after(t, js, dead, 1, time.Time{})
}

// A purge of the record that ends with an error may have been applied all the
// same (its answer lost in a cluster leader change): replay reads the record
// again and, gone, queues the job; still there, it fails with record and
// letter kept, and the next replay queues it. Before, replay just failed, and
// in the cluster campaign a job kept neither a record nor a queued message
// (red team round 20, cluster F1). And a concurrent replay that queued the
// job meanwhile is not undone: putting the old record back over it made its
// dispatcher ack it unrun (the second pass).
// Mutations caught: afterPurgeError not read (the purge's error returned:
// applied=true red), or the record put back instead (concurrent red).
func TestPurgeWhoseAnswerIsLostKeepsTheRecord(t *testing.T) {
	for _, tc := range []struct {
		name              string
		applied, parallel bool
	}{{"applied", true, false}, {"not applied", false, false}, {"applied with a concurrent replay", true, true}} {
		t.Run(tc.name, func(t *testing.T) {
			b := testenv.StartBus(t, jsprov.Options{})
			js := b.JS
			dead := replayJobReq("lostpurge")
			deadLetter(t, js, dead, 3, t0)
			terminal(t, js, dead, schemas.StatusFailed, t0)
			var concurrent map[string]replayOutcome
			purgeResult = func(ctx context.Context, js jetstream.JetStream, tenant, id string, seq uint64) error {
				if tc.applied {
					if err := results.PurgeUpTo(ctx, js, tenant, id, seq); err != nil {
						return err
					}
				}
				if tc.parallel {
					purgeResult = results.PurgeUpTo
					concurrent, _ = replayOnce(t, b, false)
				}
				return fmt.Errorf("bus: purge result %s: %w", id, context.DeadlineExceeded)
			}
			defer func() { purgeResult = results.PurgeUpTo }()
			outs, errs := replayOnce(t, b, false)
			switch {
			case tc.parallel:
				if concurrent[dead.ID] != replayRequeued || outs[dead.ID] != replayQueued {
					t.Fatalf("concurrent replay %d, this one %d (%v); want requeued, then queued", concurrent[dead.ID], outs[dead.ID], errs[dead.ID])
				}
				after(t, js, dead, 1, time.Time{})
				return
			case tc.applied:
				if outs[dead.ID] != replayRequeued {
					t.Fatalf("outcome %d, error %v; want requeued", outs[dead.ID], errs[dead.ID])
				}
				after(t, js, dead, 1, time.Time{})
				return
			}
			if outs[dead.ID] != replayFailed || errs[dead.ID] == nil || !strings.Contains(errs[dead.ID].Error(), "its record is in place") {
				t.Fatalf("outcome %d, error %v; want failed with the record in place", outs[dead.ID], errs[dead.ID])
			}
			if got := storedAt(t, js, dead); !got.Equal(t0) {
				t.Fatalf("RESULTS holds the record finished %v, want the dead one's %v", got, t0)
			}
			if n := count(t, js, subjects.StreamDLQ, subjects.DLQ(dead.Tenant, dead.ID)); n != 1 {
				t.Fatalf("%d dead letters, want the 1 kept", n)
			}
			purgeResult = results.PurgeUpTo
			if outs, errs = replayOnce(t, b, false); outs[dead.ID] != replayRequeued {
				t.Fatalf("the next replay: outcome %d, error %v", outs[dead.ID], errs[dead.ID])
			}
			after(t, js, dead, 1, time.Time{})
		})
	}
}

// A replay stops at the first failure of the store: on a full disk it went on
// through 30 letters, purging and refusing each, and a job whose record could
// not be put back was left with only its letter (red team round 21). The
// letters after the failure are untouched, and the next replay finishes them.
// Mutation caught: replayDLQ without the stop: "b" and "c" replayed by the
// first run: red.
func TestReplayStopsAtAStoreFailure(t *testing.T) {
	b := testenv.StartBus(t, jsprov.Options{})
	js := b.JS
	jobs := []schemas.JobRequest{replayJobReq("a"), replayJobReq("b"), replayJobReq("c")}
	for _, j := range jobs {
		deadLetter(t, js, j, 3, t0)
		terminal(t, js, j, schemas.StatusFailed, t0)
	}
	purgeResult = func(ctx context.Context, js jetstream.JetStream, tenant, id string, seq uint64) error {
		return fmt.Errorf("bus: purge result %s: write RESULTS/msgs/1.blk: no space left on device", id)
	}
	defer func() { purgeResult = results.PurgeUpTo }()
	outs := map[string]replayOutcome{}
	_, _, err := replayDLQ(context.Background(), js, replayFilter{}, false, false, func(rec *schemas.DLQRecordMsg, o replayOutcome, err error) {
		outs[rec.Job.ID] = o
	})
	if !errors.Is(err, errReplayStopped) || len(outs) != 1 || outs["a"] != replayFailed {
		t.Fatalf("walk error %v, outcomes %v; want stopped after a's failure", err, outs)
	}
	for _, j := range jobs {
		if n := count(t, js, subjects.StreamDLQ, subjects.DLQ(j.Tenant, j.ID)); n != 1 || !storedAt(t, js, j).Equal(t0) {
			t.Fatalf("%s: %d dead letters, record finished %v; want its letter and record untouched", j.ID, n, storedAt(t, js, j))
		}
	}
	purgeResult = results.PurgeUpTo
	if outs, _ := replayOnce(t, b, false); len(outs) != 3 {
		t.Fatalf("the next replay: %v", outs)
	}
	for _, j := range jobs {
		after(t, js, j, 1, time.Time{})
	}
}
