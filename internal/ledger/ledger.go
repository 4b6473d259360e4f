// Package ledger owns LEDGER: per job, what JetStream's delivery count does
// not say about its attempts. A dispatcher numbers a job's attempt from the
// count of its JOBS message's deliveries, and two things break that count:
//
//   - a delivery handed back (a dispatcher that stops naks the jobs it holds
//     but has not placed on a worker): counted, it used up an attempt that
//     never ran, and a few rolling restarts failed jobs that had never run
//     attempts_exhausted (the operator red team);
//   - attempts started in-process (a retry after a failure, on the same
//     delivery): not counted, so the next delivery, after the dispatcher
//     stopped, numbered its attempt as one that had already run, and the
//     caller's stream, which orders events by attempt, dropped the new run's
//     text as a repeat of the old.
//
// Both are rare paths, so the ledger is written only there: an Entry per job,
// the last one kept (one message per subject), read only on a redelivery.
// Everything else numbers attempts from the delivery count alone, as before.
// A failed write leaves the count as it was, which is safe: a handed-back
// delivery then counts as an attempt (as before the ledger), and a retry
// whose write failed is not started in-process but handed back, so its next
// delivery numbers it afresh (dispatcher/ledger.go). A dispatcher that
// crashes writes nothing: its delivery counts as an attempt, the same
// conservative direction — a number may be skipped, never used twice.
package ledger

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/mlx-serving/mlx-serving/internal/jserr"
	"github.com/mlx-serving/mlx-serving/internal/jsget"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/nats-io/nats.go/jetstream"
)

// Entry is what a dispatcher writes during one delivery of a job's JOBS
// message. It is ignored by a delivery of another message (Seq: a replayed or
// resubmitted job starts afresh).
type Entry struct {
	// Seq is the JOBS stream sequence of the job's message.
	Seq uint64 `json:"seq"`
	// At is the delivery count of the delivery that wrote it.
	At int `json:"at"`
	// Offset is added to a later delivery's count to number its attempt:
	// minus one per delivery handed back unrun, plus one per attempt started
	// in-process.
	Offset int `json:"offset"`
	// High is the highest attempt number offered to a worker so far: no later
	// attempt is numbered at or below it.
	High int `json:"high"`
	// Spared counts the attempts numbered but not counted against
	// max_attempts (an offer lost to the dispatcher's own NATS outage), so a
	// later delivery's limit leaves them out too.
	Spared int `json:"spared,omitempty"`
}

// Attempt numbers the attempt of delivery delivered of message seq, whose
// job's attempts start after base: base + delivered, moved by the entry's
// offset when it was written by an earlier delivery of the same message, and
// never at or below an attempt already offered. A count that went back (a
// crashed server loses the counts it had not flushed) keeps only that floor.
func (e Entry) Attempt(seq uint64, base, delivered int) int {
	a := base + delivered
	if e.Seq != seq {
		return max(a, base+1)
	}
	if e.At < delivered {
		a += e.Offset
	}
	if a <= e.High {
		a = e.High + 1
	}
	return max(a, base+1)
}

// HandBack is the entry a delivery writes when it hands the job back to JOBS
// with attempt next not started (a dispatcher stopping): the next delivery
// gets that number, so a hand-back uses no attempt. high is the highest
// attempt offered so far, below next.
func HandBack(seq uint64, base, delivered, next, high int) Entry {
	return Entry{Seq: seq, At: delivered, Offset: next - 1 - base - delivered, High: high}
}

// Retry is the entry a delivery writes before it starts attempt next
// in-process: the next delivery numbers its attempt after it.
func Retry(seq uint64, base, delivered, next int) Entry {
	return Entry{Seq: seq, At: delivered, Offset: next - base - delivered, High: next}
}

// Read returns the job's entry from LEDGER's leader and the entry's stream
// sequence (the zero Entry and 0 when it has none).
func Read(ctx context.Context, js jetstream.JetStream, tenant, jobID string) (Entry, uint64, error) {
	data, seq, err := jsget.Leader(ctx, js, subjects.StreamLedger, subjects.Ledger(tenant, jobID))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return Entry{}, 0, nil
	}
	if err != nil {
		return Entry{}, 0, err
	}
	var e Entry
	if err := json.Unmarshal(data, &e); err != nil {
		return Entry{}, 0, fmt.Errorf("ledger: decode entry of %s: %w", jobID, err)
	}
	return e, seq, nil
}

// ErrStale: the ledger holds an entry of a later delivery of the same message;
// the writer is a holder whose delivery has been superseded and writes nothing.
var ErrStale = errors.New("ledger: a later delivery wrote the job's entry")

// Write stores e as the job's entry. It reads the entry first and replaces it
// only if it is no later delivery's, expecting that very entry still there
// (the server refuses the write otherwise), so two holders of one message —
// one of them past its ack wait — cannot put an older count over a newer.
func Write(ctx context.Context, js jetstream.JetStream, tenant, jobID string, e Entry) error {
	data, err := json.Marshal(e)
	if err != nil {
		return err
	}
	cur, last, err := Read(ctx, js, tenant, jobID)
	if err != nil {
		return err
	}
	if cur.Seq == e.Seq && cur.At > e.At {
		return ErrStale
	}
	if _, err := js.Publish(ctx, subjects.Ledger(tenant, jobID), data,
		jetstream.WithExpectStream(subjects.StreamLedger), jetstream.WithExpectLastSequencePerSubject(last)); err != nil {
		return jserr.Map(err, "write ledger of "+jobID)
	}
	return nil
}

// Drop removes the job's entry once its terminal record is stored (best
// effort: left, it expires with the stream's max age).
func Drop(ctx context.Context, s jetstream.Stream, tenant, jobID string) error {
	return s.Purge(ctx, jetstream.WithPurgeSubject(subjects.Ledger(tenant, jobID)))
}
