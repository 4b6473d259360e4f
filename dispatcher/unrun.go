package dispatcher

import "time"

// Deliveries this dispatcher handed back before any offer because their check
// failed (intake could not read RESULTS or LEDGER: handBack). Such a delivery
// runs nothing, yet the consumer counts it, and the ledger note that would say
// so needs the same JetStream that just failed. In a three-node cluster whose
// JOBS leader was SIGKILLed, RESULTS reads answered 503 for ~8 s; each 1 s
// nak burnt a delivery, and 8 jobs ended attempts_exhausted at attempt 0
// without a run (TestClusterLosesNothing, a full-suite run of this session).
// This dispatcher remembers them by stream sequence and numbers a later
// delivery of the same message without them; other dispatchers, which cannot
// know, still count them (conservative: a number is never used twice).
//
// Only an unbroken run of unrun deliveries that ends just before this one is
// left out. Another dispatcher may have taken a delivery in between and
// numbered its attempt from the raw count, unrun deliveries included, and
// offered it (red team round 21: d1 handed J back twice, d2 ran delivery 3
// as attempt 3 and crashed, and d1 numbered delivery 4 as 4-2 = attempt 2;
// the real worker drops an assignment older than the attempt it runs, so
// attempt 2 never ran, d1 refused attempt 3's record, and the job waited
// for attempt_timeout). A gap in the run means someone else held a delivery:
// the raw count is used, as before these notes.

// unrunKeep bounds how long, and unrunMax how many, are remembered.
const (
	unrunKeep = time.Hour
	unrunMax  = 100_000
)

type unrunNote struct {
	n    int
	last int // the delivery count of the last unrun delivery noted
	at   time.Time
}

// unrunNotes are the notes by stream sequence, and when they were last pruned.
type unrunNotes struct {
	m      map[uint64]unrunNote
	pruned time.Time
}

// noteUnrun remembers one more unrun delivery of the JOBS message at seq,
// its delivery count delivered; a note whose last delivery was not the one
// before starts again. Callers hold d.mu.
func (d *Dispatcher) noteUnrunLocked(seq uint64, delivered int, now time.Time) {
	u, ok := d.unrun.m[seq]
	if ok && u.last != delivered-1 {
		u.n = 0 // not contiguous: another holder may have numbered an attempt in between
	}
	if !ok && len(d.unrun.m) >= unrunMax {
		return // forgotten: counted, as before
	}
	if d.unrun.m == nil {
		d.unrun.m = map[uint64]unrunNote{}
	}
	d.unrun.m[seq] = unrunNote{n: u.n + 1, last: delivered, at: now}
}

// countedDeliveries is delivered less this dispatcher's unrun deliveries of
// the message at seq when they are the deliveries just before this one, at
// least 1 (this one); otherwise delivered. Callers hold d.mu.
func (d *Dispatcher) countedDeliveriesLocked(seq uint64, delivered int) int {
	u := d.unrun.m[seq]
	if u.last != delivered-1 {
		return delivered
	}
	return max(delivered-u.n, 1)
}

// pruneUnrun forgets notes older than unrunKeep, at most once a minute.
// Callers hold d.mu.
func (d *Dispatcher) pruneUnrunLocked(now time.Time) {
	if len(d.unrun.m) == 0 || now.Sub(d.unrun.pruned) < time.Minute {
		return
	}
	d.unrun.pruned = now
	for seq, u := range d.unrun.m {
		if now.Sub(u.at) > unrunKeep {
			delete(d.unrun.m, seq)
		}
	}
}
