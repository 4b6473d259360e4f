package dispatcher

import (
	"context"
	"errors"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/mlx-serving/mlx-serving/internal/jserr"
	"github.com/mlx-serving/mlx-serving/internal/results"
)

// A terminal write the store refuses is tried again here, holding the job's
// JOBS delivery, rather than handed back to run the job again.
//
// Why: a record is what the job's run produced. Handed back (a nak), the
// delivery ran the job again, used one more attempt, and wrote a record only
// once the store took writes: during a store outage (a full disk, RESULTS at
// its limits, a cluster without a leader) a fast job used up its attempts in
// seconds and ended attempts_exhausted although every run of it had succeeded
// (operator round 2, F2, left open then). Kept and written again, the
// record the job earned is the one stored, under the attempt that earned it.
//
// While any write waits to be tried again, the dispatcher places no new job
// (refusingWrites, read by schedule): a job run now could not have its record
// stored either, and each would hold one more record in memory. Jobs already
// placed run on; their records join the wait. What stops the tries: the write
// lands, another record is found stored (first writer wins), the error cannot
// pass by waiting (a record too large for the store), or the dispatcher stops
// (its write context, which outlives the stop by WriteGrace, ends): the
// delivery is then handed back, as before, and its next run writes a record.
//
// The JOBS message is kept alive meanwhile (an in-progress ack every
// AckWait/3): redelivered, another dispatcher would run the job again.

const (
	writeRetryFirst = 100 * time.Millisecond
	writeRetryMax   = 2 * time.Second
)

// errWriteStopped: the dispatcher stopped before the store took the write.
var errWriteStopped = errors.New("dispatcher: stopped while the store refused the write")

// writeRetryable reports whether a failed terminal write may succeed later.
func writeRetryable(err error) bool {
	return err != nil && !errors.Is(err, results.ErrResultExists) && !jserr.IsTooLarge(err)
}

// retryWrite calls try until it returns an error writeRetryable refuses (nil
// among them), counting each refused try, or until ctx ends. keepAlive runs
// at least every keepAliveEvery while it waits. The dispatcher places no jobs
// while any retryWrite waits (see above).
func (d *Dispatcher) retryWrite(ctx context.Context, try func() error, keepAlive func(), keepAliveEvery time.Duration, onRefused func(tries int, err error)) error {
	err := try()
	if !writeRetryable(err) {
		return err
	}
	d.refusingWrites.Add(1)
	defer func() {
		if d.refusingWrites.Add(-1) == 0 {
			poke(d.wakeSched) // placement may resume
		}
	}()
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval, bo.MaxInterval, bo.MaxElapsedTime = writeRetryFirst, writeRetryMax, 0
	alive := time.Now()
	for tries := 1; ; tries++ {
		d.count().writeFailed()
		onRefused(tries, err)
		t := time.NewTimer(bo.NextBackOff())
		select {
		case <-ctx.Done():
			t.Stop()
			return errors.Join(errWriteStopped, err)
		case <-t.C:
		}
		if time.Since(alive) >= keepAliveEvery {
			keepAlive()
			alive = time.Now()
		}
		if err = try(); !writeRetryable(err) {
			return err
		}
	}
}
