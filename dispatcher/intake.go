package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jserr"
	"github.com/mlx-serving/mlx-serving/internal/ledger"
	"github.com/mlx-serving/mlx-serving/internal/prefix"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/mlx-serving/mlx-serving/tracing"
	"github.com/nats-io/nats.go/jetstream"
)

// intakeAll checks a fetched batch concurrently (each check is a round trip or
// two), then settles every delivery under one lock, in stream order, so the
// scheduler never sees a later job of a priority before an earlier one.
// behind, when set, is what the fetch left in the consumer: stored with them.
func (d *Dispatcher) intakeAll(p int, msgs []jetstream.Msg, behind *uint64) {
	verdicts := make([]func(), len(msgs))
	if len(msgs) == 1 {
		verdicts[0] = d.check(p, msgs[0], true)
	} else {
		// The checks of a batch overlap one another, each on its own
		// goroutine, so each makes its RESULTS read itself rather than on a
		// further goroutine: one fresh goroutine per job fewer, each of which
		// grew its stack through the request path.
		var wg sync.WaitGroup
		for i, m := range msgs {
			wg.Add(1)
			d.warm.Go(func() { defer wg.Done(); verdicts[i] = d.check(p, m, false) })
		}
		wg.Wait()
	}
	d.mu.Lock()
	for _, v := range verdicts {
		if v != nil {
			v()
		}
	}
	if behind != nil {
		// With the jobs, under the lock the scheduler reads both with: set
		// before the checks, a scheduler woken meanwhile (a heartbeat) saw
		// "none behind" and sent the previous fetch's jobs without these (a
		// CI failure: eight queued jobs went as five and three); set after
		// the poke, one that ran in between saw "more behind" and waited
		// MaxWait for nothing (this session's review).
		d.behind[p].Store(*behind)
	}
	d.mu.Unlock()
	poke(d.wakeSched)
}

// check decides what a delivery is: finished already, cancelled, expired,
// invalid, out of attempts, or a job to run. It does the I/O and returns the
// verdict to apply under d.mu (nil: nothing left to do). With overlap the
// RESULTS read runs on a goroutine of its own while the body is decoded (a
// lone job's latency), else one after the other.
func (d *Dispatcher) check(p int, m jetstream.Msg, overlap bool) func() {
	md, err := m.Metadata()
	if err != nil {
		d.log.Error().Err(err).Msg("message without metadata")
		_ = m.Term()
		return nil
	}
	ref, _, ok := subjects.ParseJob(m.Subject())
	if !ok {
		d.notAJob(m, md.Sequence.Stream)
		return nil
	}
	id, key := ref.ID, ref.Key()
	now := time.Now()
	d.mu.Lock()
	if old := d.jobs[key]; old != nil {
		if old.seq != md.Sequence.Stream {
			// Not a redelivery but a second message for the same job: the same
			// tenant and id at another priority (another subject), which a raw
			// publisher can still store (the client's publish expectation
			// refuses it). Taking it for a redelivery ran both messages, on two
			// dispatchers, as attempt 1 of one job, and the caller's stream
			// mixed two runs. The job that is held runs; this message is
			// terminated so it is never delivered again.
			d.mu.Unlock()
			d.count().duplicateMsg()
			d.rare.Warn().Str("job_id", id).Str("tenant", ref.Tenant).Uint64("seq", md.Sequence.Stream).Uint64("held_seq", old.seq).
				Msg("second message for a job this dispatcher holds: terminated")
			_ = m.TermWithReason("duplicate job id")
			return nil
		}
		// A redelivery of a job this dispatcher holds (e.g. in-progress acks were
		// late): ack through the newest delivery, never run it twice.
		old.msg = m
		old.progress = now
		d.mu.Unlock()
		return nil
	}
	// Registered before the checks, so a cancel or result arriving meanwhile
	// finds it (and marks it) instead of looking in the stream.
	j := &job{id: id, tenant: ref.Tenant, key: key, pri: p, msg: m, seq: md.Sequence.Stream, attempt: int(md.NumDelivered), state: StateQueued, intaking: true, progress: now}
	j.tctx = tracing.ExtractHeader(context.Background(), m.Headers())
	d.jobs[key] = j
	d.mu.Unlock()

	// A job may have finished already (its ack was lost in a crash): it must
	// not run again. Read from the leader, not a direct get a replica may
	// answer a moment behind. Checked on every delivery, not only on
	// redeliveries (NumDelivered > 1): after a cluster leader change a consumer
	// can hand out a message again with a delivery count of 1 (its earlier
	// delivery was not replicated), and the full fault campaign then ran a
	// finished job a second time under the same attempt number, mixing two
	// runs' tokens on the caller's stream; a single server that crashed loses
	// the delivery counts it had not flushed (they are written about ten
	// times a second), and a finished job's id submitted again is a new
	// message with a count of 1. For a lone job the read runs while the body
	// is decoded and validated, so it costs it no time of its own.
	stored := make(chan storedResult, 1)
	lookup := func() {
		raw, err := results.Stored(d.wctx, d.js, j.tenant, id)
		stored <- storedResult{raw, err}
	}
	if overlap {
		go lookup()
	}
	invalid := d.decode(j, m.Data())
	size := 0
	if invalid == nil {
		// Once per job, outside the lock: batching reads it (assignsize.go).
		size = encodedJobSize(&j.req)
		invalid = d.tooLargeToAssign(size)
	}
	if !overlap && invalid == nil { // an invalid job's record is not read
		lookup()
	}
	var entry ledger.Entry
	var ledgerErr error
	if invalid == nil {
		entry, ledgerErr = d.readLedger(j, int(md.NumDelivered))
		d.confirmCancel(d.wctx, ref)
	}
	chain := prefix.OfJob(&j.req) // once per job, outside the lock: routing reads it
	d.mu.Lock()
	j.chain, j.size = chain, size
	if !j.gone {
		d.startDispatch(j)
	}
	d.mu.Unlock()
	if invalid == nil {
		r := <-stored
		raw, err := r.raw, r.err
		if errors.Is(err, bus.ErrNoResult) {
			raw, err = nil, nil
		}
		if err == nil && ledgerErr != nil && raw == nil {
			err = fmt.Errorf("read the attempt ledger of %s: %w", id, ledgerErr)
		}
		if err != nil {
			d.handBack(j, err)
			return nil
		}
		if raw != nil {
			var res struct {
				Status string `json:"status"`
			}
			if err := json.Unmarshal(raw, &res); err != nil {
				d.handBack(j, fmt.Errorf("decode result of %s: %w", id, err))
				return nil
			}
			return func() {
				if !j.gone {
					d.finishObserved(j, res.Status)
					d.count().alreadyFinished()
				}
			}
		}
	}
	return func() {
		// Every stored cancel is known (watchCancels read them all before the
		// first pull and follows the stream): no round trip per job.
		cancelled := invalid == nil && d.cancelledLocked(key)
		if j.gone {
			return
		}
		j.intaking = false
		// A replayed job carries the attempts it used before; numbering goes on
		// from there and MaxAttempts counts afresh.
		base, asked := attemptBase(&j.req, d.cfg.MaxAttempts)
		if base != asked {
			d.count().baseClamped()
			d.rare.Warn().Str("job_id", id).Str("tenant", j.tenant).Int("asked", asked).Int("base", base).
				Msg("attempt base in the job's metadata clamped so its attempts fit the schemas")
		}
		j.base = base
		j.numberAttempt(entry, d.countedDeliveriesLocked(j.seq, int(md.NumDelivered)))
		switch {
		case invalid != nil:
			d.finishByDispatcher(j, EvFailed, schemas.StatusFailed, &schemas.ErrorInfo{Code: schemas.CodeInvalidRequest, Message: invalid.Error()})
		case cancelled || j.cancelReq:
			d.finishByDispatcher(j, EvCancel, schemas.StatusCancelled, &schemas.ErrorInfo{Code: schemas.CodeCancelled, Message: "cancelled while queued"})
		case j.req.Deadline != nil && time.Now().After(*j.req.Deadline):
			d.finishByDispatcher(j, EvExpire, schemas.StatusExpired, &schemas.ErrorInfo{Code: schemas.CodeDeadlineExceeded, Message: "deadline passed before the job ran"})
		case j.counted() > d.cfg.MaxAttempts && d.graceExhaustedLocked(j):
			// Handed back once: its last attempt may still run (exhaust.go).
		case j.counted() > d.cfg.MaxAttempts:
			// Deliveries that ran, as far as the ledger knows: a delivery
			// handed back unrun is not counted (ledger.go), one whose note
			// failed or that a crashed dispatcher held is.
			j.lastErr = schemas.ErrorInfo{Code: schemas.CodeRedelivered, Message: fmt.Sprintf("delivered %d times", md.NumDelivered)}
			d.finishByDispatcher(j, EvDeadLetter, schemas.StatusFailed, &schemas.ErrorInfo{Code: schemas.CodeAttemptsExhausted,
				Message: fmt.Sprintf("gave up: attempt %d would pass max_attempts %d, after %d deliveries without a terminal record (runs on workers that were lost, or dispatchers that stopped, crashed or could not write; or deliveries lost in transit when a NATS server failed, which count too: the job may never have run)",
					j.counted(), d.cfg.MaxAttempts, md.NumDelivered)})
		case d.draining:
			d.handBackLocked(j)
		default:
			d.enqueue(j, now)
			if d.queuedHook != nil {
				d.queuedHook(md.Timestamp, now, time.Now())
			}
		}
	}
}

// storedResult is what results.Stored answered.
type storedResult struct {
	raw []byte
	err error
}

// decode fills j.req, or says why the job is invalid.
func (d *Dispatcher) decode(j *job, data []byte) error {
	req, err := decodeJob(subjects.JobRef{Tenant: j.tenant, ID: j.id}, data)
	j.req = req
	if err != nil && !errors.Is(err, schemas.ErrInvalid) {
		d.log.Debug().Err(err).Str("job_id", j.id).Str("tenant", j.tenant).Msg("invalid job")
	}
	return err
}

// notAJob ends a message on JOBS from which no job can be derived (its subject
// names no valid tenant, priority or id, e.g. a literal wildcard): the raw
// message is dead-lettered with the reason, then terminated, so it is neither
// redelivered nor left in the queue. Logged at a bounded rate and counted.
func (d *Dispatcher) notAJob(m jetstream.Msg, seq uint64) {
	d.count().notAJob()
	rec := rawDeadLetter(m.Subject(), m.Data(), d.cfg.DispatcherID, time.Now().UTC())
	data, err := json.Marshal(rec)
	if err == nil {
		_, err = d.js.Publish(d.wctx, subjects.RawDLQ(seq), data, jetstream.WithMsgID("raw."+strconv.FormatUint(seq, 10)))
	}
	switch {
	case jserr.IsFull(err) || jserr.IsTooLarge(err):
		// Refused for good (as storeDeadLetter): a nak would bring it back
		// every 5 s for as long as the DLQ is full, or for ever when the
		// wrapped body (base64, a third larger) exceeds the max payload.
		d.count().deadLetterRefused()
		d.rare.Error().Err(err).Str("subject", m.Subject()).Uint64("seq", seq).Int("bytes", len(m.Data())).
			Msg("message on JOBS is not a job, and the DLQ refused its dead letter (full or too large): terminated, counted, not stored")
		_ = m.TermWithReason("not a job; dead letter refused")
		return
	case err != nil:
		// Kept for a later try, so the message is never dropped unrecorded.
		d.rare.Error().Err(err).Str("subject", m.Subject()).Msg("dead-lettering a message that is not a job failed; retrying later")
		_ = m.NakWithDelay(5 * time.Second)
		return
	}
	d.rare.Warn().Str("subject", m.Subject()).Uint64("seq", seq).Msg("message on JOBS is not a job: dead-lettered and terminated")
	_ = m.TermWithReason("not a job")
}

// handBack returns a delivery that could not be checked to JetStream.
func (d *Dispatcher) handBack(j *job, err error) {
	d.log.Warn().Err(err).Str("job_id", j.id).Int("attempt", j.attempt).Str("model", j.req.Model).Msg("delivery check failed; nak")
	d.mu.Lock()
	if !j.gone {
		d.forget(j)
	}
	d.noteUnrunLocked(j.seq, j.attempt, time.Now()) // no offer was made: unrun.go
	d.mu.Unlock()
	_ = j.msg.NakWithDelay(time.Second)
}

// enqueue puts j into its priority queue in stream order. Callers hold d.mu.
func (d *Dispatcher) enqueue(j *job, now time.Time) {
	q := d.queues[j.pri]
	i := sort.Search(len(q), func(i int) bool { return q[i].seq > j.seq })
	q = append(q, nil)
	copy(q[i+1:], q[i:])
	q[i] = j
	d.queues[j.pri] = q
	j.inQueue = true
	j.enqueued = now
	poke(d.wakeSched)
}

func (d *Dispatcher) unqueue(j *job) {
	q := d.queues[j.pri]
	for i, x := range q {
		if x == j {
			d.queues[j.pri] = append(q[:i], q[i+1:]...)
			break
		}
	}
	j.inQueue = false
}

// attemptBase is the attempts a replayed job used before (its metadata
// schemas.MetadataAttemptBase), clamped so that every attempt this dispatcher
// can number — up to base + maxAttempts — stays within schemas.MaxAttempt.
// Unclamped, any producer (the key is plain job metadata) could make an
// accepted job never end: attempt 101 fails the assignment, result and
// attempt-report schemas, so every record of it is dropped and the job is kept
// running and in-progress-acked for ever. A replay also sets the base to the
// attempts the dead letter counted, earlier bases included, so a job replayed
// often enough reached the same state. asked is the value the job named
// (0 when absent, negative or not a number).
func attemptBase(req *schemas.JobRequest, maxAttempts int) (base, asked int) {
	n, err := strconv.Atoi(req.Metadata[schemas.MetadataAttemptBase])
	if err != nil || n < 0 {
		return 0, 0
	}
	return max(0, min(n, schemas.MaxAttempt-maxAttempts)), n
}
