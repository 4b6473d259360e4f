package dispatcher

// Model availability: whether the jobs of a model can be placed, must wait, or
// should end. A model no live worker serves is checked against the models
// bucket (what workers announced lately): jobs of a model that was served
// lately wait in JOBS for it to come back (a rolling restart), jobs of one
// nobody announced are dead-lettered model_not_available. The scheduler
// (batcher.go) asks here before it forms a model's batch.

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// modelUnserved reports whether workers are up but none of them has the model:
// then waiting would not help. A fleet with no ready worker at all is an outage,
// and jobs wait for it to end. Callers hold d.mu.
func (d *Dispatcher) modelUnserved(model string, now time.Time) bool {
	ready := false
	for _, w := range d.workers {
		if w.lost || now.Sub(w.seenAt) > d.cfg.WorkerTTL {
			continue
		}
		if slices.Contains(w.hb.Models, model) {
			return false
		}
		ready = ready || w.hb.State == schemas.WorkerReady
	}
	return ready
}

// deadLetterUnserved fails the queued jobs of a model no live worker serves once
// they have waited ModelWait (room for a worker that is still loading it), into
// the DLQ so they can be replayed when one does. It returns when to look again.
//
// A model no worker has announced within the models bucket's grace (a typo, a
// model nobody deployed) is not coming back within ModelWait: its jobs are
// dead-lettered at once. Waiting them out would hold them in the credit
// (free slots + MaxBatch, shared by every tenant) for ModelWait each, and one
// tenant's burst of such jobs would stall every tenant's queue. Until the
// bucket has answered (or when it could not), the model is "unknown" and its
// jobs wait ModelWait as before. Callers hold d.mu.
//
// A model the bucket says was served within its grace (its worker restarting,
// reloading it: a rolling restart of a model's only worker) is coming back:
// past ModelWait its jobs are handed back to JOBS for ModelWait instead of
// failed (parkLocked), which frees the credit they held, and each returns
// until the model is served again or its announcement has expired, when it
// is dead-lettered at once. Before, they ended model_not_available after
// ModelWait, 26 of 30 in the operator round's rolling restart with a 40 s load.
// Until a fresh answer is in, nothing is decided: the lookup pokes the
// scheduler when it comes.
func (d *Dispatcher) deadLetterUnserved(model string, now time.Time) time.Time {
	wait := d.cfg.ModelWait
	state := d.announcement(model, now)
	switch state {
	case announcedNever:
		wait = 0
	case announcedPending:
		return now.Add(d.announcementTTL())
	}
	var next time.Time
	for q := range schemas.NumPriorities {
		for _, j := range slices.Clone(d.queues[q]) {
			if j.req.Model != model {
				continue
			}
			if due := j.enqueued.Add(wait); now.Before(due) {
				if next.IsZero() || due.Before(next) {
					next = due
				}
				continue
			}
			d.unqueue(j)
			if state == announcedServed {
				d.parkLocked(j)
				continue
			}
			d.finishByDispatcher(j, EvDeadLetter, schemas.StatusFailed, &schemas.ErrorInfo{
				Code: schemas.CodeModelNotAvailable, Message: fmt.Sprintf("no worker serves model %q", model)})
		}
	}
	return next
}

// announcements caches, per model, the models bucket's answer to "has any
// worker announced it within ModelGrace?" (registry.ModelServed, the check
// producers fail fast on), so that a burst of jobs for one model costs one
// lookup. Its own lock, never held with I/O; lookups run outside d.mu.
type announcements struct {
	mu     sync.Mutex
	byName map[string]announcement
	asking map[string]bool // lookups under way
}

type announcement struct {
	never  bool      // the bucket answered: nobody announced the model within its grace
	served bool      // the bucket answered: a worker announced it within its grace
	at     time.Time // when the answer came
}

// What the models bucket says of a model, as far as this dispatcher knows.
const (
	announcedPending = iota // no fresh answer yet: a lookup is under way
	announcedUnknown        // the lookup failed: decide as if it may come back, after ModelWait
	announcedNever          // nobody announced it within the bucket's grace
	announcedServed         // a worker announced it within the grace
)

// announcement is the models bucket's fresh answer for model, starting a
// lookup when there is none (neverAnnounced). Callers hold d.mu.
func (d *Dispatcher) announcement(model string, now time.Time) int {
	if d.neverAnnounced(model, now) {
		return announcedNever
	}
	a := d.announced
	a.mu.Lock()
	defer a.mu.Unlock()
	e, ok := a.byName[model]
	switch {
	case !ok || now.Sub(e.at) >= d.announcementTTL() || now.Before(e.at):
		return announcedPending
	case e.served:
		return announcedServed
	}
	return announcedUnknown
}

func newAnnouncements() *announcements {
	return &announcements{byName: map[string]announcement{}, asking: map[string]bool{}}
}

// announcementTTL is how long a lookup's answer is used: short, so a model a
// worker has just announced is not refused for long (a live worker that has
// it is seen in its heartbeat first anyway: modelUnserved).
func (d *Dispatcher) announcementTTL() time.Duration {
	return min(time.Second, d.cfg.ModelWait/10)
}

// neverAnnounced reports whether a fresh lookup found that no worker announced
// model within the models bucket's grace. Without a fresh answer it starts a
// lookup (outside d.mu; the scheduler is woken when it answers) and reports
// false: unknown, so the jobs wait ModelWait. Callers hold d.mu.
func (d *Dispatcher) neverAnnounced(model string, now time.Time) bool {
	a := d.announced
	ttl := d.announcementTTL()
	a.mu.Lock()
	defer a.mu.Unlock()
	if e, ok := a.byName[model]; ok && now.Sub(e.at) < ttl && !now.Before(e.at) {
		return e.never
	}
	if a.asking[model] || d.wctx == nil {
		return false
	}
	a.asking[model] = true
	d.io.Add(1)
	go func() {
		defer d.io.Done()
		ctx, cancel := context.WithTimeout(d.wctx, d.cfg.AssignTimeout)
		served, err := registry.ModelServed(ctx, d.js, model)
		cancel()
		if err != nil {
			// Unknown: never dead-letter on a lookup that failed.
			d.rare.Warn().Err(err).Str("model", model).Msg("models bucket lookup failed; the model's jobs wait ModelWait")
		}
		at := time.Now()
		a.mu.Lock()
		delete(a.asking, model)
		for m, e := range a.byName { // forget stale answers: one per model name ever seen would grow without bound
			if at.Sub(e.at) >= ttl {
				delete(a.byName, m)
			}
		}
		a.byName[model] = announcement{never: err == nil && !served, served: err == nil && served, at: at}
		a.mu.Unlock()
		poke(d.wakeSched)
	}()
	return false
}
