package dispatcher

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// tickLoop runs tick: often enough to keep held messages inside AckWait and to
// notice a worker whose heartbeat is older than WorkerTTL.
func (d *Dispatcher) tickLoop(ctx context.Context) {
	every := min(d.cfg.AckWait/6, d.cfg.WorkerTTL/4, time.Second)
	every = max(every, 10*time.Millisecond)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		d.hearing.unanswered = !probe(d.nc, every) // hearing.go
		d.tick(time.Now())
	}
}

// tick keeps held messages alive, expires queued jobs and detects lost workers.
func (d *Dispatcher) tick(now time.Time) {
	var alive []jetstream.Msg
	d.mu.Lock()
	for _, j := range d.jobs {
		if now.Sub(j.progress) >= d.cfg.AckWait/3 {
			j.progress = now
			alive = append(alive, j.msg)
		}
		// j.req is read only once intake is done with it (decode writes it
		// outside the lock).
		switch {
		case (j.state == StateQueued && !j.intaking) || j.state == StateRetrying:
			if j.req.Deadline != nil && now.After(*j.req.Deadline) {
				d.finishByDispatcher(j, EvExpire, schemas.StatusExpired, &schemas.ErrorInfo{Code: schemas.CodeDeadlineExceeded, Message: "deadline passed before the job ran"})
			}
		case j.state == StateRunning || j.state == StateDispatched:
			// Its worker should have ended it at the deadline; one that did not
			// within the grace is not trusted with it any longer. Should its
			// record come after all, RESULTS keeps whichever was first.
			switch {
			case j.req.Deadline != nil && now.After(j.req.Deadline.Add(d.cfg.DeadlineGrace)):
				d.forwardCancel(j, "deadline passed")
				d.finishByDispatcher(j, EvExpire, schemas.StatusExpired, &schemas.ErrorInfo{Code: schemas.CodeDeadlineExceeded, Message: "deadline passed and the worker did not end the job"})
			case !j.givenUp.IsZero():
				if now.Sub(j.givenUp) > d.cfg.DeadlineGrace {
					d.attemptAbandoned(j, now)
				}
			case now.Sub(j.offered) > d.cfg.AttemptTimeout:
				d.attemptTimedOut(j, now)
			}
		}
	}
	d.pruneCancels(now)
	d.pruneUnrunLocked(now)
	if d.hearing.deafSince(d.nc, now, d.cfg.WorkerTTL) {
		d.count().deafTick()
		d.heardAllNow(now) // hearing.go
	}
	for id, w := range d.workers {
		// A worker streaming tokens for its jobs is alive, whatever its
		// heartbeat's age: on a full disk no heartbeat can be stored, and
		// every worker was declared lost after the TTL, its running jobs
		// retried and their completed records refused as superseded (red
		// team, store outages, F3: 8 of 8 failed attempts_exhausted).
		if !w.lost && now.Sub(w.seenAt) > d.cfg.WorkerTTL && now.Sub(w.aliveAt) > d.cfg.WorkerTTL {
			d.workerLost(id, "heartbeat older than worker TTL")
		}
	}
	d.mu.Unlock()
	for _, m := range alive {
		_ = m.InProgress()
	}
}

// attemptTimedOut gives up on j's current attempt, which its worker has held
// longer than AttemptTimeout: the worker is told to stop that attempt and
// report it for retry (the message names the attempt, so a later attempt on
// the same worker is not stopped by it). The report carries exactly the text
// the caller was sent, and onAttemptReport retries the job from there; the
// dispatcher's own copy of that text may lag behind events still on their
// way, and a retry resumed from it made half the callers' streams diverge
// (the red team's R9-3). A worker that does not report within DeadlineGrace
// is given up on (attemptAbandoned). Should it still hand over a record of
// the attempt meanwhile, that record ends the job. Callers hold d.mu.
func (d *Dispatcher) attemptTimedOut(j *job, now time.Time) {
	d.count().attemptTimedOut()
	j.givenUp = now
	d.forwardStop(j, "attempt timed out", true)
}

// attemptAbandoned retries j without its worker's report: the worker was told
// to stop the attempt DeadlineGrace ago and said nothing (hung, or a worker
// credential that takes jobs and never runs them: the red team's N2). Its
// breaker counts a failure; the retry resumes from the text tracked from the
// attempt's progress events. Callers hold d.mu.
func (d *Dispatcher) attemptAbandoned(j *job, now time.Time) {
	if w := d.workers[j.workerID]; w != nil {
		w.br.Record(false, now)
	}
	d.retryableFailure(j, schemas.ErrorInfo{Code: schemas.CodeAttemptTimeout, Retryable: true,
		Message: fmt.Sprintf("the attempt ran longer than %s on worker %s, which did not stop it", d.cfg.AttemptTimeout, j.workerID)}, nil, 0)
}
