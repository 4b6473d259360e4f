package dispatcher

import (
	"context"
	"errors"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/ledger"
)

// Attempt numbering across deliveries (internal/ledger says why). A job's
// attempt is its delivery count moved by its ledger entry, which is read only
// on a redelivery and written only on the two paths the count gets wrong: a
// delivery handed back without any offer, and a retry started in-process.

// readLedger returns the entry that numbers a delivery's attempt: none for a
// first delivery (nothing can have been written for it), else LEDGER's.
// Called outside d.mu.
func (d *Dispatcher) readLedger(j *job, delivered int) (ledger.Entry, error) {
	if delivered <= 1 {
		return ledger.Entry{}, nil
	}
	e, _, err := ledger.Read(d.wctx, d.js, j.tenant, j.id)
	return e, err
}

// numberAttempt sets j's attempt for this delivery from its entry. Callers
// hold d.mu.
func (j *job) numberAttempt(e ledger.Entry, delivered int) {
	j.deliv = delivered
	j.attempt = e.Attempt(j.seq, j.base, delivered)
	if e.Seq == j.seq {
		j.high, j.spared = e.High, e.Spared
		j.ledgered = e.At > 0 // an entry of this message: dropped with the record
	}
}

// handBackLocked returns j's delivery to JOBS (a nak) because this
// dispatcher stops or drains, first noting in the ledger the attempt j would
// run next, which has not started: the next delivery runs it under that
// number, so the hand-back uses none of the job's attempts. A failed note
// leaves the delivery counted (as before the ledger: an attempt used up,
// never a number used twice). A job not yet checked has no number of its
// own: its redelivery counts from the delivery count, as it would have.
// Callers hold d.mu; the write and the nak run on a goroutine of their own.
func (d *Dispatcher) handBackLocked(j *job) { d.handBackAfter(j, 0) }

// parkLocked hands j back to JOBS for ModelWait, its attempt noted as
// handBackLocked notes it: a job of a model whose worker is away for a while
// (reloading it) waits in the stream, not in this dispatcher's credit, and
// uses no attempt (deadLetterUnserved). Callers hold d.mu.
func (d *Dispatcher) parkLocked(j *job) {
	d.count().parked()
	d.jobLog(d.rare.Info(), j).Dur("for", d.cfg.ModelWait).Msg("no live worker has the model, which a worker served recently: handed back to JOBS to wait for it")
	d.handBackAfter(j, d.cfg.ModelWait)
}

// handBackAfter is handBackLocked with the redelivery delayed by delay (0:
// at once).
func (d *Dispatcher) handBackAfter(j *job, delay time.Duration) {
	d.forget(j)
	m := j.msg
	nak := func() {
		if delay > 0 {
			_ = m.NakWithDelay(delay)
		} else {
			_ = m.Nak()
		}
	}
	if j.deliv == 0 {
		nak()
		return
	}
	next, high := j.attempt, j.high
	if j.state == StateRetrying {
		next++ // j.attempt ran and failed; its retry had not started
	}
	if j.ran {
		high = max(high, next-1) // every attempt offered in this delivery is below next
	}
	e := ledger.HandBack(j.seq, j.base, j.deliv, next, high)
	e.Spared = j.spared
	tenant, id := j.tenant, j.id
	d.goWrite(func(ctx context.Context) {
		if err := ledger.Write(ctx, d.js, tenant, id, e); err != nil {
			d.ledgerWriteFailed(err, tenant, id, "the hand-back counts as an attempt")
		} else {
			d.count().handBackNoted()
		}
		nak()
	})
}

// noteRetry writes the ledger entry of j's next attempt before it may start
// (batcher.go waits while j.noting): a delivery after this one, should this
// dispatcher stop, must not number its attempt as one that already ran. If the
// entry cannot be written the retry is not started here: the delivery is
// handed back, and its redelivery numbers the attempt from the count, which
// is then the higher. Callers hold d.mu.
func (d *Dispatcher) noteRetry(j *job) {
	e := j.retryEntry()
	j.noting = true
	tenant, id := j.tenant, j.id
	d.goWrite(func(ctx context.Context) {
		err := ledger.Write(ctx, d.js, tenant, id, e)
		d.mu.Lock()
		defer d.mu.Unlock()
		j.noting = false
		if err == nil {
			// Not j.high: that is what earlier deliveries offered; the
			// entry's High is next only in case this dispatcher crashes
			// before the retry starts (a hand-back knows better).
			j.ledgered = true
			poke(d.wakeSched)
			return
		}
		d.ledgerWriteFailed(err, tenant, id, "retry handed back to JOBS instead of started here")
		if !j.gone && j.state == StateRetrying {
			d.forget(j)
			_ = j.msg.Nak()
		}
	})
}

// dropLedger removes a job's entry once its record is stored (best effort: a
// left entry names this message's sequence, which no other message of the job
// has, and expires with LEDGER's max age). Never before the record is stored:
// a write that fails is redelivered, and that delivery is numbered from the
// entry.
func (d *Dispatcher) dropLedger(tenant, id string) {
	d.io.Add(1)
	go func() {
		defer d.io.Done()
		if err := ledger.Drop(d.tctx, d.ledgerStream, tenant, id); err != nil && !errors.Is(err, context.Canceled) {
			d.log.Debug().Err(err).Str("job_id", id).Str("tenant", tenant).Msg("dropping the ledger entry failed; it expires with LEDGER's max age")
		}
	}()
}

func (d *Dispatcher) ledgerWriteFailed(err error, tenant, id, what string) {
	if errors.Is(err, ledger.ErrStale) {
		return // a later delivery holds the job: nothing of ours to note
	}
	d.count().ledgerWriteFailed()
	d.rare.Warn().Err(err).Str("job_id", id).Str("tenant", tenant).Msg("writing the attempt ledger failed: " + what)
}

// retryEntry is the ledger entry of j's next attempt, the attempts spared so
// far with it. Callers hold d.mu.
func (j *job) retryEntry() ledger.Entry {
	e := ledger.Retry(j.seq, j.base, j.deliv, j.attempt+1)
	e.Spared = j.spared
	return e
}
