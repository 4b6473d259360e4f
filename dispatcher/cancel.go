package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go/jetstream"
)

// watchCancels follows CANCELS from its first message: the stored cancels
// (CANCELS keeps them a day) fill d.cancelled, so a delivery is checked against
// it without a round trip, and each new cancel is acted on (onCancel) once
// stored. It returns once the stored backlog has been read, with a stop
// function; until then no job is pulled, so none can miss its cancel. It
// returns ctx's error as soon as ctx ends, backlog read or not.
//
// The backlog is read in pulls of at most streamPullBytes: unbounded (500
// messages a pull), a backlog of large cancels made the server push hundreds
// of megabytes at once, drop the dispatcher's connection as a slow consumer,
// and do it again on every reconnect (red-team F2: a restarted dispatcher sat
// at 0 CPU with 100,041 cancels pending). jsprov now caps a cancel at 8 KiB,
// but a stream provisioned before may still hold larger ones.
func (d *Dispatcher) watchCancels(ctx context.Context) (func(), error) {
	info, err := d.cancelsStream.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("dispatcher: stream %s: %w", subjects.StreamCancels, err)
	}
	backlog := info.State.LastSeq
	d.mu.Lock()
	d.cancelsMaxAge = info.Config.MaxAge
	d.mu.Unlock()
	caughtUp := make(chan struct{})
	var once sync.Once
	done := func() { once.Do(func() { close(caughtUp) }) }
	if backlog == 0 || info.State.Msgs == 0 {
		done()
	}
	// read is the stream sequence of the last cancel handled.
	var read atomic.Uint64
	handle := func(m jetstream.Msg) {
		md, err := m.Metadata()
		if err != nil {
			d.onCancel(m.Subject(), m.Data(), true)
			return
		}
		d.onCancel(m.Subject(), m.Data(), md.Sequence.Stream > backlog)
		read.Store(md.Sequence.Stream)
		if md.Sequence.Stream >= backlog || md.NumPending == 0 {
			done()
		}
	}
	f, err := d.followStream(ctx, subjects.StreamCancels, subjects.CancelAll, handle, &read)
	if err != nil {
		return nil, fmt.Errorf("dispatcher: follow %s: %w", subjects.StreamCancels, err)
	}
	// The backlog ends with the message after which none is pending; should
	// its last messages expire or be replaced before they are read, the
	// consumer's own count says so.
	poll := time.NewTicker(time.Second)
	defer poll.Stop()
	for {
		select {
		case <-caughtUp:
			return f.stop, nil
		case <-ctx.Done():
			f.stop()
			return nil, ctx.Err()
		case <-poll.C:
			if ci, err := f.info(ctx); err == nil && ci.NumPending == 0 && read.Load() >= ci.Delivered.Stream {
				done()
			}
		}
	}
}

// streamPullBytes bounds the bytes one pull of CANCELS (or RESULTS, whose
// records of up to a max payload each come in bursts) may bring: a few MiB,
// well under what the server buffers for a client before it drops it as a slow
// consumer (64 MiB by default), and never less than one message of the
// server's max payload, or a larger cancel stored before jsprov capped them
// would be refused to every pull and stop the consumer on it.
func streamPullBytes(maxPayload int64) int {
	const pull = 4 << 20
	if need := maxPayload + 64<<10; need > pull {
		return int(need)
	}
	return pull
}

// cancelledLocked reports whether a stored cancel names ref. Callers hold d.mu.
func (d *Dispatcher) cancelledLocked(key string) bool {
	_, ok := d.cancelled[key]
	return ok
}

// pruneCancels forgets cancels older than CANCELS keeps them, at most once a
// minute. Callers hold d.mu.
func (d *Dispatcher) pruneCancels(now time.Time) {
	if d.cancelsMaxAge <= 0 || now.Sub(d.prunedAt) < time.Minute {
		return
	}
	d.prunedAt = now
	for k, at := range d.cancelled {
		if now.Sub(at) > d.cancelsMaxAge {
			delete(d.cancelled, k)
		}
	}
}

// logBadCancel is logged (sampled) for a stored cancel that is no cancel.
const logBadCancel = "stored cancel is no cancel: ignored"

// onCancel handles mlx.cancel.<tenant>.<id>: a held job not on a worker ends at
// once; a running one is cancelled by its worker, to which the cancel is
// forwarded (mlx.worker.<id>.cancel: workers read no other job's cancels); a
// job still in JOBS is deleted there and finished cancelled. The tenant is the
// subject's, which the server's permissions bind to the canceller's credential.
// A cancel from the stored backlog (live false) is only remembered: the jobs it
// names are checked against it when delivered.
func (d *Dispatcher) onCancel(subject string, data []byte, live bool) {
	ref, reason, ok := decodeCancel(subject, data)
	if !ok {
		d.count().badCancel()
		d.rare.Warn().Str("subject", subject).Int("bytes", len(data)).Msg(logBadCancel)
		return
	}
	d.mu.Lock()
	d.cancelled[ref.Key()] = time.Now()
	if !live {
		d.mu.Unlock()
		return
	}
	j := d.jobs[ref.Key()]
	if j != nil {
		j.cancelReq = true
		switch {
		case (j.state == StateQueued && !j.intaking) || j.state == StateRetrying:
			d.finishByDispatcher(j, EvCancel, schemas.StatusCancelled, &schemas.ErrorInfo{Code: schemas.CodeCancelled, Message: reason})
		case j.state == StateRunning:
			d.forwardCancel(j, reason)
		}
		// Dispatched: forwarded once the worker accepts (assign).
		d.mu.Unlock()
		return
	}
	if d.draining {
		d.mu.Unlock()
		return
	}
	d.goWrite(func(ctx context.Context) { d.cancelInStream(ctx, ref, reason) })
	d.mu.Unlock()
}

// forwardCancel tells j's worker to stop it; the worker ends it with a
// cancelled record handed back on its done subject. Callers hold d.mu.
func (d *Dispatcher) forwardCancel(j *job, reason string) { d.forwardStop(j, reason, false) }

// forwardStop tells j's worker to stop its current attempt (the message names
// it): with retry, the worker reports the attempt for retry with the text it
// sent instead of ending the job. Callers hold d.mu.
func (d *Dispatcher) forwardStop(j *job, reason string, retry bool) {
	data, err := json.Marshal(schemas.CancelMsg{JobID: j.id, Tenant: subjects.TenantOfToken(j.tenant), Attempt: j.attempt, Retry: retry, Reason: reason, RequestedAt: time.Now().UTC()})
	if err == nil {
		err = d.nc.PublishRequest(subjects.WorkerCancel(j.workerID), d.mark, data) // subjects.Sent
	}
	if err != nil {
		d.jobLog(d.log.Warn(), j).Err(err).Msg("forward cancel")
	}
}

// cancelInStream finds a job still waiting in JOBS, deletes it and writes its
// terminal. Several dispatchers may race here, and with a dispatcher that
// pulled the job meanwhile: RESULTS' first-writer-wins settles it, and a
// dispatcher holding the job learns of the record from RESULTS.
//
// Only a message no consumer has delivered yet is waiting for sure. A work-queue
// message stays in JOBS until acked, so one that was delivered and is still
// there is held — by another dispatcher, queued there or running on a worker —
// or waits to be delivered again (a nak, an ack wait past). Either way the cancel
// reaches the job: every dispatcher follows CANCELS, so its holder ends it with
// what the caller was sent, and a redelivery finds the stored cancel at intake.
// Cancelling such a message here wrote an attempt-0 record with no text and no
// usage over a job still streaming elsewhere, and deleted its message from under
// its dispatcher: with two dispatchers, most cancels of running jobs (red team
// round 11, F4).
func (d *Dispatcher) cancelInStream(ctx context.Context, ref subjects.JobRef, reason string) {
	if d.cancelQueued(ctx, ref, reason) {
		return
	}
	// Not in JOBS: ended, or not submitted yet (the cancel then waits for it).
	// An ended job's cancel is dropped (dropCancel).
	if _, err := results.Stored(ctx, d.js, ref.Tenant, ref.ID); err == nil {
		d.dropCancel(ctx, ref.Tenant, ref.ID)
	}
}

// cancelQueued ends a job JOBS holds and no consumer has delivered (see
// cancelInStream); it reports whether JOBS held the job at all.
func (d *Dispatcher) cancelQueued(ctx context.Context, ref subjects.JobRef, reason string) bool {
	for i, p := range schemas.Priorities {
		raw, err := lastMsg(ctx, d.jobsStream, subjects.Job(ref.Tenant, p, ref.ID))
		if err != nil || raw == nil {
			continue
		}
		if held, err := d.delivered(ctx, i, raw.Sequence); err != nil || held {
			if err != nil {
				d.log.Warn().Err(err).Str("job_id", ref.ID).Str("tenant", ref.Tenant).
					Msg("cancel: consumer state unknown; the job is cancelled when it is delivered")
			}
			d.count().cancelLeft()
			return true
		}
		var req schemas.JobRequest
		_ = json.Unmarshal(raw.Data, &req)
		res := &schemas.ResultMsg{Type: "result", JobID: ref.ID, Attempt: 0, Status: schemas.StatusCancelled, FinishReason: "cancelled",
			Error: &schemas.ErrorInfo{Code: schemas.CodeCancelled, Message: reason}, Model: req.Model, Tenant: subjects.TenantOfToken(ref.Tenant), FinishedAt: time.Now().UTC()}
		j := &job{id: ref.ID, tenant: ref.Tenant, req: req}
		// Stored, then removed: deleting first would lose the job to a crash
		// in between. A dispatcher that holds it meanwhile sees the record.
		err = results.Finish(ctx, d.js, res, j.replyTo())
		switch {
		case err == nil:
			d.count().finished(StateCancelled)
		case errors.Is(err, results.ErrResultExists):
		default:
			d.log.Error().Err(err).Str("job_id", ref.ID).Str("tenant", ref.Tenant).Int("attempt", 0).Str("model", req.Model).Msg("record cancelled result failed")
			return true
		}
		_ = d.jobsStream.DeleteMsg(ctx, raw.Sequence)
		d.dropCancel(ctx, ref.Tenant, ref.ID)
		return true
	}
	return false
}

// dropCancel purges the stored cancel of tenant's (a subject token) job id,
// once its terminal record is stored, if this dispatcher knows of one.
//
// Why: a cancel was kept a day whether or not its job had ended. Every
// streamed HTTP request a client abandons stores one (n of them for n
// choices), and an HTTP tenant filled CANCELS (100,000) in minutes: for the
// rest of the day no tenant's cancel was stored, and disconnected clients'
// jobs ran on (red team round 19, tenanthttp F1). Once the record is stored
// a cancel has no use: a redelivery, a resubmission or a dispatcher's restart
// finds the record first. Cancels of jobs that end are now gone as they end.
func (d *Dispatcher) dropCancel(ctx context.Context, tenant, id string) {
	ref := subjects.JobRef{Tenant: tenant, ID: id}
	d.mu.Lock()
	at, known := d.cancelled[ref.Key()]
	d.mu.Unlock()
	if !known {
		return
	}
	if err := d.cancelsStream.Purge(ctx, jetstream.WithPurgeSubject(subjects.Cancel(tenant, id))); err != nil {
		if ctx.Err() == nil {
			d.rare.Warn().Err(err).Str("job_id", id).Msg("could not drop the stored cancel of an ended job; it stays until CANCELS' max age")
		}
		return
	}
	// Forgotten too, or a replay of the job would still be cancelled here
	// (the final review); other dispatchers check at intake (confirmCancel).
	d.forgetCancel(ref, at)
}

// forgetCancel forgets the cancel of ref remembered at at, unless a newer one
// came meanwhile (onCancel stores its own time): that one stays, or a cancel
// stored after the read or purge was lost from memory, and a delivery handed
// back and delivered again ran although CANCELS held it (the last review).
func (d *Dispatcher) forgetCancel(ref subjects.JobRef, at time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if now, ok := d.cancelled[ref.Key()]; ok && now.Equal(at) {
		delete(d.cancelled, ref.Key())
	}
}

// confirmCancel forgets a cancel of ref that this dispatcher remembers but
// CANCELS no longer holds: a dispatcher dropped it when the job ended
// (dropCancel), and a delivery of the id now is a new run of the job (replay
// queues it again). Remembered, the cancel ended that run "cancelled while
// queued" on every dispatcher but the one that dropped it (the final
// review). A read for remembered cancels only, which are rare; one that
// fails keeps the cancel (the job ends cancelled, as before).
func (d *Dispatcher) confirmCancel(ctx context.Context, ref subjects.JobRef) {
	d.mu.Lock()
	at, known := d.cancelled[ref.Key()]
	d.mu.Unlock()
	if !known {
		return
	}
	if raw, err := lastMsg(ctx, d.cancelsStream, subjects.Cancel(ref.Tenant, ref.ID)); err != nil || raw != nil {
		return
	}
	d.forgetCancel(ref, at)
}

// delivered reports whether the consumer of priority index p has delivered the
// JOBS message at stream sequence seq: consumers deliver in stream order from
// the first message (DeliverAllPolicy), so every message up to the last one
// delivered was. A consumer whose delivery state was lost in a server crash can
// report less, and the cancel then goes ahead as for a waiting job.
func (d *Dispatcher) delivered(ctx context.Context, p int, seq uint64) (bool, error) {
	info, err := d.consumers[p].Info(ctx)
	if err != nil {
		return false, err
	}
	return seq <= info.Delivered.Stream, nil
}
