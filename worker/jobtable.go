package worker

import (
	"context"
	"sync"
	"time"
)

// jobTable tracks slots and running jobs. A job gives its slot back when its
// model work is over, before its end is published (freeSlot), and leaves the
// table when it has ended (release): a dispatcher that sees the end may fill
// the slot at once, and a drain still waits for the end to be published.
type jobTable struct {
	mu      sync.Mutex
	slots   int
	used    int
	running map[string]*jobRun
	changed chan struct{} // closed and replaced whenever used or running changes
	onBusy  func()
	onIdle  func()
	onCount func(used int) // called under mu on every change; may be nil
	onRoom  func()         // called under mu when a full table frees a slot; may be nil
}

func newJobTable(slots int, onBusy, onIdle func()) *jobTable {
	return &jobTable{slots: slots, running: map[string]*jobRun{}, changed: make(chan struct{}), onBusy: onBusy, onIdle: onIdle}
}

func (t *jobTable) inFlight() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.used
}

func (t *jobTable) free() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.slots - t.used
}

func (t *jobTable) notifyLocked() {
	close(t.changed)
	t.changed = make(chan struct{})
}

// reserve starts tracking runs if at least need slots are free (a batch is taken
// whole or not at all); it returns the free slots left.
func (t *jobTable) reserve(runs []*jobRun, need int) (ok bool, free int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.slots-t.used < need {
		return false, t.slots - t.used
	}
	wasIdle := t.used == 0
	for _, r := range runs {
		t.running[r.key] = r
	}
	t.used += len(runs)
	t.notifyLocked()
	if t.onCount != nil {
		t.onCount(t.used)
	}
	if wasIdle && t.used > 0 && t.onBusy != nil {
		t.onBusy()
	}
	return true, t.slots - t.used
}

// freeSlot gives r's slot back and returns the time taken just before: the
// stamp of the job's end (finished_at, reported_at). A heartbeat stamped
// earlier than it counted the job, which dispatchers rely on.
func (t *jobTable) freeSlot(r *jobRun) time.Time {
	now := time.Now().UTC()
	t.mu.Lock()
	defer t.mu.Unlock()
	t.freeSlotLocked(r)
	return now
}

func (t *jobTable) freeSlotLocked(r *jobRun) {
	if r.slotFreed {
		return
	}
	r.slotFreed = true
	wasFull := t.used == t.slots
	t.used--
	t.notifyLocked()
	if t.onCount != nil {
		t.onCount(t.used)
	}
	if t.used == 0 && t.onIdle != nil {
		t.onIdle()
	}
	if wasFull && t.onRoom != nil {
		t.onRoom()
	}
}

// release ends r's tracking (and frees its slot if freeSlot did not).
func (t *jobTable) release(r *jobRun) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.running[r.key] == r {
		delete(t.running, r.key)
	}
	t.freeSlotLocked(r)
	t.notifyLocked()
}

func (t *jobTable) get(key string) *jobRun {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.running[key]
}

func (t *jobTable) all() []*jobRun {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]*jobRun, 0, len(t.running))
	for _, r := range t.running {
		out = append(out, r)
	}
	return out
}

// waitIdle returns once no job runs or is publishing its end, or ctx's error.
func (t *jobTable) waitIdle(ctx context.Context) error {
	for {
		t.mu.Lock()
		idle, ch := t.used == 0 && len(t.running) == 0, t.changed
		t.mu.Unlock()
		if idle {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ch:
		}
	}
}
