package dispatcher

import (
	"encoding/json"
	"slices"
	"time"

	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go/jetstream"
)

// workerView is what this dispatcher knows of one worker. Guarded by d.mu.
type workerView struct {
	id     string
	hb     schemas.HeartbeatMsg
	seenAt time.Time
	lost   bool
	br     *breaker
	// pending: jobs in assignments sent and not answered; unreflected: jobs
	// accepted since the last heartbeat (which did not count them yet).
	pending     int
	unreflected int
	// capOverride is the free slots the worker's last reply stated (-1: none
	// since the last heartbeat); it is fresher than the heartbeat.
	capOverride int
}

func (w *workerView) free() int {
	f := w.hb.Slots - w.hb.InFlight - w.unreflected
	if w.capOverride >= 0 {
		f = min(f, w.capOverride)
	}
	return max(f-w.pending, 0)
}

// routable: alive, ready and not behind an open breaker (a cooled-down open
// breaker counts: it will let a probe through).
func (w *workerView) routable(now time.Time) bool {
	if w.lost || w.hb.State != schemas.WorkerReady {
		return false
	}
	switch w.br.state {
	case BreakerOpen:
		return now.Sub(w.br.openedAt) >= w.br.cooldown
	case BreakerHalfOpen:
		return !w.br.probing
	}
	return true
}

// pickWorker returns the least loaded routable worker that has the model loaded
// and a free slot. Callers hold d.mu.
func (d *Dispatcher) pickWorker(model string, now time.Time) *workerView {
	var best *workerView
	var bestLoad float64
	for _, w := range d.workers {
		if !w.routable(now) || w.free() <= 0 || !slices.Contains(w.hb.Models, model) {
			continue
		}
		load := float64(w.hb.Slots-w.free()) / float64(max(w.hb.Slots, 1))
		if best == nil || load < bestLoad || (load == bestLoad && w.id < best.id) {
			best, bestLoad = w, load
		}
	}
	if best != nil && !best.br.allow(now) {
		return nil
	}
	return best
}

func (d *Dispatcher) watchLoop(kw jetstream.KeyWatcher) {
	for e := range kw.Updates() {
		if e == nil {
			continue // end of the initial values
		}
		d.mu.Lock()
		switch e.Operation() {
		case jetstream.KeyValuePut:
			var hb schemas.HeartbeatMsg
			if err := json.Unmarshal(e.Value(), &hb); err != nil {
				d.log.Warn().Err(err).Str("worker", e.Key()).Msg("bad heartbeat")
				break
			}
			w := d.workers[e.Key()]
			if w == nil {
				w = &workerView{id: e.Key(), br: newBreaker(d.cfg.BreakerThreshold, d.cfg.BreakerCooldown)}
				d.workers[e.Key()] = w
			}
			w.hb = hb
			// An old entry replayed at start is only as fresh as its write.
			seen, now := e.Created(), time.Now()
			if seen.IsZero() || seen.After(now) {
				seen = now
			}
			w.seenAt = seen
			w.lost = false
			w.unreflected = 0
			w.capOverride = -1
		case jetstream.KeyValueDelete, jetstream.KeyValuePurge:
			d.workerLost(e.Key(), "registry entry deleted")
		}
		d.mu.Unlock()
		poke(d.wakePull)
		poke(d.wakeSched)
	}
}

// workerLost retries every job of this dispatcher that ran on the worker.
// Callers hold d.mu.
func (d *Dispatcher) workerLost(id, why string) {
	w := d.workers[id]
	if w == nil || w.lost {
		return
	}
	w.lost = true
	d.metrics.WorkersLost.Add(1)
	d.log.Warn().Str("worker", id).Str("why", why).Msg("worker lost")
	for _, j := range d.jobs {
		if j.workerID == id && (j.state == StateRunning || j.state == StateDispatched) {
			d.retryableFailure(j, schemas.ErrorInfo{Code: "worker_lost", Message: why, Retryable: true}, nil, 0)
		}
	}
}
