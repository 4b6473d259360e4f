package dispatcher

import (
	"fmt"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/rs/zerolog"
)

// apply moves j through the transition table; the only place a job's state
// changes. Callers hold d.mu.
func (d *Dispatcher) apply(j *job, e Trigger) error {
	from := j.state
	to, err := Transition(from, e)
	if err != nil {
		d.count().illegal()
		d.jobLog(d.log.Error(), j).Err(err).Msg("illegal transition")
		return err
	}
	d.count().transition(from, e)
	onW := func(s State) bool { return s == StateDispatched || s == StateRunning }
	if onW(from) && !onW(to) {
		d.onWorker--
	} else if !onW(from) && onW(to) {
		d.onWorker++
	}
	if from == StateRunning {
		d.slotFreed(j)
	} else if to == StateRunning {
		if w := d.workers[j.workerID]; w != nil {
			w.mine++
		}
	}
	j.state = to
	if e == EvDispatch {
		j.offered, j.givenUp = time.Now(), time.Time{} // the attempt's clock (AttemptTimeout)
	}
	d.count().finished(to)
	return nil
}

// forget drops j from every index. Callers hold d.mu.
func (d *Dispatcher) forget(j *job) {
	if j.gone {
		return
	}
	j.gone = true
	d.endDispatch(j, j.lastErr.Code) // a job that ends before a worker took it
	if d.jobs[j.key] == j {
		delete(d.jobs, j.key)
	}
	if j.inQueue {
		d.unqueue(j)
	}
	if d.retrying[j.key] == j {
		delete(d.retrying, j.key)
	}
	if (j.state == StateDispatched || j.state == StateRunning) && !j.state.Terminal() {
		d.onWorker--
	}
	poke(d.changed)
	poke(d.wakePull)
	poke(d.wakeSched) // its slot may be free now: held jobs can go
}

// retryableFailure ends the current attempt of j; it is retried after a backoff
// or dead-lettered. resume is what the caller has received so far, if known
// better than from the progress events (an attempt report). Callers hold d.mu.
func (d *Dispatcher) retryableFailure(j *job, info schemas.ErrorInfo, resume *schemas.Resume, nextSeq int) {
	if err := d.apply(j, EvAttemptFailed); err != nil {
		return
	}
	if resume != nil {
		// The worker's report carries what it sent: authoritative (and from
		// the worker the job runs on: onAttemptReport checks).
		d.setResume(j, *resume)
		j.nextSeq = nextSeq
		j.resetCur()
		j.settling = false
	} else {
		// Only its token events tell what the attempt sent, and some may not
		// have been handled yet: the resume is taken once they have (settle.go).
		j.settling = true
		j.settleBy = time.Now().Add(d.cfg.AssignTimeout)
	}
	j.lastErr = info
	d.jobLog(d.log.Warn(), j).Str("code", info.Code).Msg("attempt failed")
	switch {
	case j.cancelReq:
		d.finishByDispatcher(j, EvCancel, schemas.StatusCancelled, &schemas.ErrorInfo{Code: schemas.CodeCancelled, Message: "cancelled while retrying"})
	case j.counted() >= d.cfg.MaxAttempts || j.attempt >= schemas.MaxAttempt:
		d.finishByDispatcher(j, EvExhausted, schemas.StatusFailed, exhaustedError(j.attempt, info))
	case d.draining:
		// Nobody here will run it again; the next delivery goes elsewhere.
		d.handBackLocked(j)
	default:
		if j.bo == nil {
			b := backoff.NewExponentialBackOff()
			b.InitialInterval = d.cfg.BackoffInitial
			b.MaxInterval = d.cfg.BackoffMax
			b.Multiplier = d.cfg.BackoffMultiplier
			b.RandomizationFactor = 0.5
			b.MaxElapsedTime = 0
			b.Reset()
			j.bo = b
		}
		j.retryAt = time.Now().Add(j.bo.NextBackOff())
		d.retrying[j.key] = j
		d.noteRetry(j)
		if j.settling {
			d.settleReplies(j)
		}
		d.count().retried()
		poke(d.wakeSched)
	}
}

// counted is how many of j's attempts count against max_attempts: those
// numbered since its base, less those spared (an offer lost to the
// dispatcher's own outage: batcher.go assign), which the ledger carries to a
// later delivery with the numbering. Callers hold d.mu.
func (j *job) counted() int { return j.attempt - j.base - j.spared }

func exhaustedError(attempts int, last schemas.ErrorInfo) *schemas.ErrorInfo {
	return &schemas.ErrorInfo{Code: schemas.CodeAttemptsExhausted, Message: fmt.Sprintf("gave up after %d attempts; last error %s: %s", attempts, last.Code, last.Message)}
}

// jobLog puts the standard job fields on a log event. Callers hold d.mu.
func (d *Dispatcher) jobLog(ev *zerolog.Event, j *job) *zerolog.Event {
	return ev.Str("job_id", j.id).Str("tenant", j.tenant).Int("attempt", j.attempt).Str("worker_id", j.workerID).Str("model", j.req.Model)
}
