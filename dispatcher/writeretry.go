package dispatcher

import (
	"context"
	"errors"
	"sync"
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
// While any record waits to be tried again, the dispatcher places no new job
// (refusingWrites, read by schedule): a job run now could not have its record
// stored either, and each would hold one more record in memory. Jobs already
// placed run on; their records join the wait. What stops the tries: the write
// lands, another record is found stored (first writer wins), the error cannot
// pass by waiting (a record too large for the store), or the dispatcher stops
// (its write context, which outlives the stop by WriteGrace, ends): the
// delivery is then handed back, as before, and its next run writes a record.
//
// The JOBS message is kept alive meanwhile (an in-progress ack every
// AckWait/3 from the first try on): redelivered, another dispatcher would run
// the job again.

const (
	writeRetryFirst = 100 * time.Millisecond
	writeRetryMax   = 2 * time.Second
	writeSlowAfter  = time.Second
)

// errLetter marks a failed dead-letter publish: tried again like a record,
// but it holds no placement (deadletter.go drops the letter after
// letterPatience; the DLQ failing says nothing of RESULTS).
var errLetter = errors.New("dispatcher: dead letter not stored")

// errWriteStopped: the dispatcher stopped before the store took the write.
var errWriteStopped = errors.New("dispatcher: stopped while the store refused the write")

// writeRetryable reports whether a failed terminal write may succeed later.
func writeRetryable(err error) bool {
	return err != nil && !errors.Is(err, results.ErrResultExists) && !jserr.IsTooLarge(err)
}

// retryWrite calls try until it returns an error writeRetryable refuses (nil
// among them), counting each refused try, or until ctx ends, raising g (no
// job placed) on a refused record; it lowers g when done. keepAlive runs
// every period until it returns.
func (d *Dispatcher) retryWrite(ctx context.Context, g *writeGate, try func() error, keepAlive func(), every time.Duration, onRefused func(err error)) error {
	defer g.lower()
	// The delivery is kept alive from the first try on, on a timer of its own:
	// tries that wait out their timeout and the backoff between them must not
	// add up past AckWait (in a test with a 2 s AckWait, a 1.6 s backoff did,
	// and so did one unanswered try of 5 s: the job came back to a second
	// delivery, which wrote a rival record or letter).
	defer keepAliveEvery(keepAlive, every)()
	err := try()
	if !writeRetryable(err) {
		return err
	}
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval, bo.MaxInterval, bo.MaxElapsedTime = writeRetryFirst, writeRetryMax, 0
	for {
		if !errors.Is(err, errLetter) {
			g.raise() // once the record itself is refused: see above
		}
		d.count().writeFailed()
		onRefused(err)
		t := time.NewTimer(bo.NextBackOff())
		select {
		case <-ctx.Done():
			t.Stop()
			return errors.Join(errWriteStopped, err)
		case <-t.C:
		}
		if err = try(); !writeRetryable(err) {
			return err
		}
	}
}

// keepAliveEvery runs keepAlive every period until the returned stop is
// called: one timer, no goroutine until it fires (a write that lands at once,
// every job's, pays only for the timer).
func keepAliveEvery(keepAlive func(), period time.Duration) (stop func()) {
	var mu sync.Mutex
	stopped := false
	var t *time.Timer
	mu.Lock()
	t = time.AfterFunc(period, func() {
		keepAlive()
		mu.Lock()
		defer mu.Unlock()
		if !stopped {
			t.Reset(period)
		}
	})
	mu.Unlock()
	return func() {
		mu.Lock()
		defer mu.Unlock()
		stopped = true
		t.Stop()
	}
}

// timedRecord runs write, a record's publish, raising g if it has not
// returned within writeSlowAfter. A store whose disk is full does not answer
// at all: each try then waits out the publish timeout (5 s), and jobs placed
// meanwhile ran into it (the red team's full disk: 40 of them). Only the
// record's publish is timed: a dead letter's, unanswered, held placement for
// every tenant for as long as the letter was tried (round 15, F2).
func timedRecord(g *writeGate, write func() error) error {
	slow := time.AfterFunc(writeSlowAfter, g.raise)
	defer slow.Stop()
	return write()
}

// writeGate is one write's hold on placement (refusingWrites): raised once
// at most, by a refusal or by a first try that is slow to answer (a timer's
// goroutine), and lowered once when the write is done; a raise after that is
// ignored.
type writeGate struct {
	d        *Dispatcher
	mu       sync.Mutex
	up, done bool
}

func (g *writeGate) raise() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.up && !g.done {
		g.up = true
		g.d.refusingWrites.Add(1)
		g.d.count().obs.RecordsHeld(1)
	}
}

func (g *writeGate) lower() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.done = true
	if g.up {
		g.up = false
		g.d.count().obs.RecordsHeld(-1)
		if g.d.refusingWrites.Add(-1) == 0 {
			poke(g.d.wakeSched) // placement may resume
		}
	}
}

// goWrite runs a terminal write on its own goroutine under tctx, counted in
// writes (awaitWrites).
func (d *Dispatcher) goWrite(f func(ctx context.Context)) {
	d.writes.Add(1)
	d.io.Add(1)
	go func() {
		defer d.io.Done()
		defer d.wrote()
		f(d.tctx)
	}()
}

// runWrite runs a terminal write on the calling goroutine, counted as
// goWrite counts it; the caller must not hold d.mu.
func (d *Dispatcher) runWrite(f func(ctx context.Context)) {
	d.writes.Add(1)
	d.io.Add(1)
	defer d.io.Done()
	defer d.wrote()
	f(d.tctx)
}

// wrote ends one count of writes.
func (d *Dispatcher) wrote() {
	d.writes.Add(-1)
	poke(d.changed)
}
