package worker

import (
	"errors"
	"fmt"
	"sync"
	"time"
)

// BreakerState is a state of the runtime circuit breaker.
type BreakerState string

// Breaker states. Closed: the runtime is (re)started with backoff. Open: too many
// crashes in a row; no restart until the cooldown passes, and the worker announces
// itself unavailable. HalfOpen: one probe restart; it must pass runtime.info, the
// model loads and a health check to close the breaker again.
const (
	BreakerClosed   BreakerState = "closed"
	BreakerOpen     BreakerState = "open"
	BreakerHalfOpen BreakerState = "half-open"
)

// BreakerEvent is what happens to the runtime.
type BreakerEvent string

// Breaker events.
const (
	// BreakerFailure: the runtime crashed or failed to start, below the threshold.
	BreakerFailure BreakerEvent = "failure"
	// BreakerTrip: a failure that reaches the threshold within the window.
	BreakerTrip BreakerEvent = "trip"
	// BreakerCooldown: the open period is over.
	BreakerCooldown BreakerEvent = "cooldown"
	// BreakerSuccess: a start passed runtime.info, model loads and health.
	BreakerSuccess BreakerEvent = "success"
)

// ErrIllegalTransition is returned for an event a state does not accept.
var ErrIllegalTransition = errors.New("worker: illegal state transition")

// breakerTable is the whole breaker: state × event → next state. A failure in
// half-open is always a trip: the probe failed.
var breakerTable = map[BreakerState]map[BreakerEvent]BreakerState{
	BreakerClosed: {
		BreakerFailure: BreakerClosed,
		BreakerTrip:    BreakerOpen,
		BreakerSuccess: BreakerClosed,
	},
	BreakerOpen: {
		BreakerCooldown: BreakerHalfOpen,
	},
	BreakerHalfOpen: {
		BreakerSuccess: BreakerClosed,
		BreakerFailure: BreakerOpen,
		BreakerTrip:    BreakerOpen,
	},
}

// BreakerOptions configures a Breaker.
type BreakerOptions struct {
	// Threshold is how many consecutive failures within Window open the breaker.
	Threshold int
	Window    time.Duration
	// Now is the clock; time.Now when nil.
	Now func() time.Time
	// OnChange is called with the new state on every change, under the breaker's
	// lock (metrics); may be nil.
	OnChange func(BreakerState)
}

// Breaker is the runtime circuit breaker. It counts failures since the last time it
// closed from half-open: a runtime that starts fine and then crashes every few
// seconds must still trip it.
type Breaker struct {
	opts     BreakerOptions
	mu       sync.Mutex
	state    BreakerState
	failures []time.Time
}

// NewBreaker returns a closed breaker.
func NewBreaker(opts BreakerOptions) *Breaker {
	if opts.Threshold <= 0 {
		opts.Threshold = 5
	}
	if opts.Window <= 0 {
		opts.Window = time.Minute
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Breaker{opts: opts, state: BreakerClosed}
}

// State is the current state.
func (b *Breaker) State() BreakerState {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.state
}

// Fire applies one event through the table.
func (b *Breaker) Fire(ev BreakerEvent) (BreakerState, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.fireLocked(ev)
}

func (b *Breaker) fireLocked(ev BreakerEvent) (BreakerState, error) {
	next, ok := breakerTable[b.state][ev]
	if !ok {
		return b.state, fmt.Errorf("%w: breaker %s on %s", ErrIllegalTransition, b.state, ev)
	}
	if b.state == BreakerHalfOpen && next == BreakerClosed {
		b.failures = b.failures[:0]
	}
	changed := next != b.state
	b.state = next
	if changed && b.opts.OnChange != nil {
		b.opts.OnChange(next)
	}
	return next, nil
}

// RecordFailure counts a crash or failed start and fires BreakerFailure or
// BreakerTrip, whichever it amounts to.
func (b *Breaker) RecordFailure() (BreakerState, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.opts.Now()
	keep := b.failures[:0]
	for _, t := range b.failures {
		if now.Sub(t) < b.opts.Window {
			keep = append(keep, t)
		}
	}
	b.failures = append(keep, now)
	ev := BreakerFailure
	if len(b.failures) >= b.opts.Threshold {
		ev = BreakerTrip
	}
	return b.fireLocked(ev)
}
