package dispatcher

import "github.com/mlx-serving/mlx-serving/schemas"

// Settling: the resume of a retry after a silent failure.
//
// An attempt that ends without a report (its worker lost or restarted, its
// assignment timed out) has told what it sent only through its token events,
// which the dispatcher handles on its progress subscription (progress.go), while the news
// of the end comes on another (the registry watch, a timer, an assignment
// reply): two goroutines. Taking the resume when the end is applied could miss
// events already received but not yet handled, and the retry would resume from
// an earlier point: the caller sees text again, or, with sampling, a different
// one (TestWorkerRestartWithinTTLRetries failed so, ~2 in 30).
//
// The events the dispatcher received before it learnt of the end are already
// queued on the progress subscription: one connection delivers in the order the
// server sent, the worker published them before it died, and its successor's
// heartbeat (or the expiry) came after. nats.Conn.Barrier runs a function once
// every async subscription of the connection has handled what it held when
// the barrier was set, so the job settles (keeps counting the failed attempt's
// events) until a barrier set after the failure has run, and is requeued with
// its resume only then (settleBy bounds the wait). Events still on their way
// from a worker that lives on (lost only to the TTL) are not waited for: what
// it sends past the resume is lost to the caller's stream anyway.
//
// The progress subscription must be on d.nc, the connection the barrier is set
// on (Run subscribes it there). A barrier costs one queued marker per
// subscription of the connection, so the jobs of one failure share one: jobs
// that start settling while a barrier is out wait for the next, set after it ran.

// settleReplies has j, which just started settling, settled by the next
// barrier. Callers hold d.mu.
func (d *Dispatcher) settleReplies(j *job) {
	d.unsettled = append(d.unsettled, j)
	if !d.barrierOut {
		d.barrierOut = true
		go d.setBarrier()
	}
}

// setBarrier sets a barrier for the jobs settling now; when it has run, they
// take their resume and may be requeued, and jobs that started settling
// meanwhile get the next barrier. Called without d.mu: the barrier's function
// takes it, and runs at once when the connection has no async subscription.
func (d *Dispatcher) setBarrier() {
	d.mu.Lock()
	batch := d.unsettled
	d.unsettled = nil
	d.mu.Unlock()
	passed := func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		for _, j := range batch {
			if j.settling && !j.gone {
				j.takeResume()
			}
		}
		poke(d.wakeSched)
		if len(d.unsettled) > 0 {
			go d.setBarrier()
		} else {
			d.barrierOut = false
		}
	}
	if err := d.nc.Barrier(passed); err != nil {
		passed() // closed: nothing more will be handled
	}
}

// takeResume ends j's settling: what the failed attempt sent becomes the
// resume of the next one, and later events of that attempt are ignored. A no-op
// when j does not settle. Callers hold d.mu.
func (j *job) takeResume() {
	if !j.settling {
		return
	}
	j.resume = j.resumeNow()
	j.resumeSize += j.curSize
	j.resetCur()
	j.settling = false
}

// resumeNow is what the caller has received of j: the resume, plus the
// failed attempt's text while it settles.
func (j *job) resumeNow() schemas.Resume {
	r := j.resume
	if j.settling {
		r.Text += j.cur.String()
		if j.curToks > 0 {
			r.CompletionTokens = j.curToks
		}
	}
	return r
}
