package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jserr"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// How replay fails: which failures stop its walk, and what a failed purge or
// requeue leaves (replay.go walks the dead letters and replays each).

// errReplayStopped: a replay stopped its walk at a failure of the store.
var errReplayStopped = errors.New("replay stopped")

// jobFailure marks a replay that failed for a reason of its job's own (its
// letter or record cannot be read, its subject has no stream, it is too
// large), which says nothing of the next job's.
type jobFailure struct{ error }

func (e jobFailure) Unwrap() error { return e.error }

// jobsOwnFailure reports whether err is a failure of its job alone: the walk
// goes on past it. Any other (a refusal, a timeout, a lost connection) is the
// store's, and stops the walk.
func jobsOwnFailure(err error) bool {
	var jf jobFailure
	return errors.As(err, &jf) || jserr.IsNoStream(err) || jserr.IsTooLarge(err)
}

// afterPurgeError handles a purge of the job's record that ended with err:
// it may have been applied all the same (its answer lost in a cluster leader
// change), and the job then had neither a record nor a queued message (red
// team round 20, cluster F1: rt506p0j0057). The record is read again, on a
// context a Ctrl-C does not end: gone, the purge was applied (by this replay
// or a concurrent one) and nil says to queue the job, as replay does (a
// concurrent replay's identical message is deduplicated); still there, the
// replay failed with record and letter kept. Putting the record back instead
// put the old failed record over a job a concurrent replay had meanwhile
// queued, whose dispatcher then acked it unrun (the second pass). A purge
// still in flight that lands after the read leaves the job recordless with
// its letter kept: the next replay queues it, and the late purge, bound to
// the old record's sequence, cannot remove the new one.
func afterPurgeError(ctx context.Context, js jetstream.JetStream, tenant, id string, err error) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	switch _, rerr := results.Stored(ctx, js, tenant, id); {
	case errors.Is(rerr, results.ErrNoResult):
		return nil
	case rerr != nil:
		return fmt.Errorf("%w; whether its record is still there is unknown (%w): its dead letter is kept, run replay again", err, rerr)
	}
	return fmt.Errorf("%w; its record is in place and its dead letter kept", err)
}

// restoreAfterRefusal handles a requeue refused with err after the job's record
// (stored, of tenant's record subject) was purged. Put back, the job keeps its terminal record and the
// letter stays for a later replay (red team round 19, opstore F3) — but only
// when JOBS is known not to hold the job: an error can also follow a publish
// that was stored (its ack lost), and a record put back over the queued job
// made its dispatcher ack it unrun (the final review). Unsure, nothing is
// put back: the next replay finds the job queued, or neither queued nor
// recorded, and queues it.
func restoreAfterRefusal(ctx context.Context, js jetstream.JetStream, dlq jetstream.Stream, subject string, seq uint64, tenant string, job *schemas.JobRequest, msg *nats.Msg, stored []byte, err error) (replayOutcome, error) {
	// Not on ctx alone: a Ctrl-C that cut the publish short would cut this
	// short too, and the record would stay purged (the last review).
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	switch held, herr := jobsMsg(ctx, js, job); {
	case herr != nil:
		return replayFailed, fmt.Errorf("%w; whether it was queued is unknown (%w): run replay again", err, herr)
	case held != nil && isMsg(held, msg):
		return replayRequeued, dropDeadLetters(ctx, dlq, subject, seq) // stored after all
	case held != nil:
		return replayEnding, stillEnding(msg)
	}
	if rerr := results.Restore(ctx, js, tenant, job.ID, stored); rerr != nil {
		if errors.Is(rerr, results.ErrResultExists) {
			// A newer record is in place: a concurrent replay queued the job,
			// which ran and ended with its one record. This letter is stale;
			// reported as "run replay again, it queues the job" it stayed, a
			// second letter for a finished job (red team round 21).
			return replayStale, dropDeadLetters(ctx, dlq, subject, seq)
		}
		return replayFailed, fmt.Errorf("%w; and its record could not be put back: %w (run replay again: it queues the job)", err, rerr)
	}
	return replayFailed, fmt.Errorf("%w; its record was put back and its dead letter kept", err)
}
