package dispatcher

import (
	"fmt"
	"time"
)

// BreakerState is a per-worker circuit breaker state.
type BreakerState uint8

// Breaker states.
const (
	BreakerClosed   BreakerState = iota // assignments flow
	BreakerOpen                         // no assignments until the cool-down elapsed
	BreakerHalfOpen                     // one probe assignment decides
	numBreakerStates
)

func (s BreakerState) String() string {
	return [...]string{"closed", "open", "half_open", "?"}[min(int(s), 3)]
}

// BreakerEvent is an outcome fed to a breaker.
type BreakerEvent uint8

// Breaker events. A failure that reaches the threshold is fed as BrTrip, so the
// table stays a plain lookup without guards.
const (
	BrSuccess  BreakerEvent = iota // an assignment was accepted
	BrFailure                      // an assignment failed or timed out, below the threshold
	BrTrip                         // a failure reaching the threshold
	BrCooldown                     // the open period elapsed: let one probe through
	numBreakerEvents
)

// breakerTable is the whole breaker: breakerTable[state][event] = next state.
// Late outcomes of assignments sent before the breaker opened leave it open.
var breakerTable = [numBreakerStates][numBreakerEvents]BreakerState{
	BreakerClosed:   {BrSuccess: BreakerClosed, BrFailure: BreakerClosed, BrTrip: BreakerOpen, BrCooldown: BreakerClosed},
	BreakerOpen:     {BrSuccess: BreakerOpen, BrFailure: BreakerOpen, BrTrip: BreakerOpen, BrCooldown: BreakerHalfOpen},
	BreakerHalfOpen: {BrSuccess: BreakerClosed, BrFailure: BreakerOpen, BrTrip: BreakerOpen, BrCooldown: BreakerHalfOpen},
}

// breaker tracks one worker. Not safe for concurrent use: the dispatcher's lock
// guards it.
type breaker struct {
	state     BreakerState
	failures  int // consecutive, while closed
	threshold int
	cooldown  time.Duration
	openedAt  time.Time
	probing   bool // a half-open probe is in flight
}

func newBreaker(threshold int, cooldown time.Duration) *breaker {
	return &breaker{threshold: threshold, cooldown: cooldown}
}

func (b *breaker) apply(e BreakerEvent, now time.Time) {
	to := breakerTable[b.state][e]
	if to == BreakerOpen && b.state != BreakerOpen {
		b.openedAt = now
	}
	if to == BreakerClosed {
		if e == BrSuccess {
			b.failures = 0
		}
	}
	b.state = to
	if to != BreakerHalfOpen {
		b.probing = false
	}
}

// record feeds an assignment outcome.
func (b *breaker) record(ok bool, now time.Time) {
	switch {
	case ok:
		b.apply(BrSuccess, now)
	case b.state == BreakerClosed && b.failures+1 < b.threshold:
		b.failures++
		b.apply(BrFailure, now)
	case b.state == BreakerClosed:
		b.failures = 0
		b.apply(BrTrip, now)
	default:
		b.apply(BrFailure, now)
	}
}

// allow says whether an assignment may go to the worker now; in half-open it lets
// exactly one probe through, and the caller must record its outcome.
func (b *breaker) allow(now time.Time) bool {
	switch b.state {
	case BreakerClosed:
		return true
	case BreakerOpen:
		if now.Sub(b.openedAt) < b.cooldown {
			return false
		}
		b.apply(BrCooldown, now)
		fallthrough
	case BreakerHalfOpen:
		return !b.probing
	}
	panic(fmt.Sprintf("breaker: unknown state %d", b.state))
}

// take marks that the assignment allow() let through is being sent.
func (b *breaker) take() {
	if b.state == BreakerHalfOpen {
		b.probing = true
	}
}
