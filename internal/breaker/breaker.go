// Package breaker is the one circuit breaker: the dispatcher keeps one per
// worker (assignments that keep failing stop being routed there) and the worker
// one for its runtime (a runtime that keeps crashing is held off). Both walk the
// same table of state × event → state; what differs is configuration: how
// failures are counted and who decides that the open period is over.
package breaker

import (
	"errors"
	"fmt"
	"sync"
	"time"
)

// State is a breaker state. Its names are what metrics and logs show:
// "closed", "open", "half-open".
type State uint8

// Breaker states.
const (
	Closed   State = iota // attempts flow
	Open                  // no attempt until the cool-down is over
	HalfOpen              // one probe attempt decides
	numStates
)

// States are every state, in order (for gauges that show each one).
func States() []State { return []State{Closed, Open, HalfOpen} }

func (s State) String() string {
	if s >= numStates {
		return fmt.Sprintf("state(%d)", uint8(s))
	}
	return [...]string{"closed", "open", "half-open"}[s]
}

// Event is what happens to the thing behind the breaker.
type Event uint8

// Breaker events. A failure that reaches the threshold is fed as Trip, so the
// table stays a plain lookup without guards; Record picks which.
const (
	Success  Event = iota // an attempt worked (an assignment accepted, a runtime start passed its checks)
	Failure               // an attempt failed, below the threshold
	Trip                  // a failure reaching the threshold
	Cooldown              // the open period is over: let one probe through
	numEvents
)

func (e Event) String() string {
	if e >= numEvents {
		return fmt.Sprintf("event(%d)", uint8(e))
	}
	return [...]string{"success", "failure", "trip", "cooldown"}[e]
}

// ErrIllegalTransition is returned for an event a state does not accept.
var ErrIllegalTransition = errors.New("breaker: illegal transition")

// illegal marks a (state, event) the table refuses.
const illegal = numStates

// table is the whole breaker: table[state][event] = next state. Late outcomes
// of attempts begun before it opened leave it open; a failed probe opens it
// again; only an open breaker cools down.
var table = [numStates][numEvents]State{
	Closed:   {Success: Closed, Failure: Closed, Trip: Open, Cooldown: illegal},
	Open:     {Success: Open, Failure: Open, Trip: Open, Cooldown: HalfOpen},
	HalfOpen: {Success: Closed, Failure: Open, Trip: Open, Cooldown: illegal},
}

// Next is the table's answer for event e in state s, and whether it is legal.
func Next(s State, e Event) (State, bool) {
	if s >= numStates || e >= numEvents {
		return s, false
	}
	to := table[s][e]
	return to, to != illegal
}

// Options configure a Breaker.
type Options struct {
	// Threshold is how many failures while closed open the breaker (5).
	Threshold int
	// Window: failures older than this are forgotten (0: none is).
	Window time.Duration
	// Consecutive: a success while closed forgets the failures before it. The
	// dispatcher sets it (an accepted assignment proves the worker); the worker
	// does not (a runtime that starts fine and then crashes every few seconds
	// must still trip it).
	Consecutive bool
	// Cooldown is how long Allow keeps an open breaker shut before it lets a
	// probe through. An owner that never calls Allow fires Cooldown itself.
	Cooldown time.Duration
	// OnChange is called with the new state on every change, under the
	// breaker's lock (metrics); may be nil.
	OnChange func(State)
}

// Breaker is a circuit breaker, safe for concurrent use. Failures are counted
// only while closed, and forgotten whenever the state changes.
type Breaker struct {
	opts     Options
	mu       sync.Mutex
	state    State
	failures []time.Time
	openedAt time.Time
	probing  bool // a half-open probe is in flight
}

// New returns a closed breaker.
func New(opts Options) *Breaker {
	if opts.Threshold <= 0 {
		opts.Threshold = 5
	}
	return &Breaker{opts: opts}
}

// State is the current state.
func (b *Breaker) State() State {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.state
}

// Fire applies one event through the table; an illegal one leaves the state
// alone and returns ErrIllegalTransition.
func (b *Breaker) Fire(e Event, now time.Time) (State, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.fire(e, now)
}

func (b *Breaker) fire(e Event, now time.Time) (State, error) {
	to, ok := Next(b.state, e)
	if !ok {
		return b.state, fmt.Errorf("%w: %s on %s", ErrIllegalTransition, b.state, e)
	}
	if e == Success && b.opts.Consecutive {
		b.failures = b.failures[:0]
	}
	if to != HalfOpen {
		b.probing = false
	}
	if to == b.state {
		return to, nil
	}
	b.failures = b.failures[:0]
	if to == Open {
		b.openedAt = now
	}
	b.state = to
	if b.opts.OnChange != nil {
		b.opts.OnChange(to)
	}
	return to, nil
}

// Record feeds an attempt's outcome: Success, or a failure as Failure or Trip,
// whichever it amounts to. It returns the new state.
func (b *Breaker) Record(ok bool, now time.Time) State {
	b.mu.Lock()
	defer b.mu.Unlock()
	e := Success
	if !ok {
		e = b.countFailure(now)
	}
	st, _ := b.fire(e, now) // every state takes Success, Failure and Trip
	return st
}

func (b *Breaker) countFailure(now time.Time) Event {
	if b.state != Closed {
		return Failure
	}
	keep := b.failures[:0]
	for _, t := range b.failures {
		if b.opts.Window <= 0 || now.Sub(t) < b.opts.Window {
			keep = append(keep, t)
		}
	}
	b.failures = append(keep, now)
	if len(b.failures) >= b.opts.Threshold {
		return Trip
	}
	return Failure
}

// Allow says whether an attempt may go now: always while closed; while open,
// once Cooldown has passed since it opened, it fires Cooldown; while half-open,
// only if no probe is in flight. The caller marks an attempt it sends with Take
// and must Record its outcome.
func (b *Breaker) Allow(now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.state == Open && now.Sub(b.openedAt) >= b.opts.Cooldown {
		_, _ = b.fire(Cooldown, now)
	}
	return b.ready(now)
}

// Ready is what Allow would answer now, without changing anything.
func (b *Breaker) Ready(now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.ready(now)
}

func (b *Breaker) ready(now time.Time) bool {
	switch b.state {
	case Open:
		return now.Sub(b.openedAt) >= b.opts.Cooldown
	case HalfOpen:
		return !b.probing
	}
	return true
}

// Take marks that the attempt Allow let through is being sent: in half-open it
// is the probe, and no other goes until its outcome is recorded.
func (b *Breaker) Take() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.state == HalfOpen {
		b.probing = true
	}
}
