package dispatcher

import "time"

// warmPool runs functions concurrently, like `go f()`, on goroutines kept a
// while for the next function instead of exiting. A fresh goroutine starts
// with a small stack and grows it, copying, through the JSON and request paths
// of the job it handles: with a goroutine per hand-over, per checked delivery
// and per assignment, runtime.copystack was ~5% of the dispatcher bench's CPU.
// Concurrency is unbounded, as with `go` (callers bound it where they did
// before); a kept goroutine exits after warmIdle without work, so a quiet
// dispatcher, or a stopped one, holds none for long.
type warmPool struct {
	work chan func() // unbuffered: a send succeeds only to a waiting goroutine
}

// warmIdle is how long a kept goroutine waits for the next function.
const warmIdle = time.Second

func newWarmPool() *warmPool { return &warmPool{work: make(chan func())} }

// Go runs f on a waiting goroutine, or on a new one when none waits.
func (p *warmPool) Go(f func()) {
	select {
	case p.work <- f:
	default:
		go p.loop(f)
	}
}

func (p *warmPool) loop(f func()) {
	t := time.NewTimer(warmIdle)
	defer t.Stop()
	for {
		f()
		t.Reset(warmIdle)
		select {
		case f = <-p.work:
		case <-t.C:
			return
		}
	}
}
