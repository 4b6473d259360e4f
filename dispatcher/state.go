package dispatcher

import (
	"errors"
	"fmt"
)

// State is where a job is in its lifecycle as seen by a dispatcher.
type State uint8

// Job states. The terminal ones are Completed, Failed, Cancelled, Expired and
// DeadLettered; nothing leaves them.
const (
	StateQueued State = iota
	StateDispatched
	StateRunning
	StateRetrying
	StateCompleted
	StateFailed
	StateCancelled
	StateExpired
	StateDeadLettered
	numStates
)

var stateNames = [...]string{"queued", "dispatched", "running", "retrying", "completed", "failed", "cancelled", "expired", "dead_lettered"}

func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("state(%d)", s)
}

// Terminal reports whether no transition leaves s.
func (s State) Terminal() bool { return s >= StateCompleted && s < numStates }

// Trigger is something that happens to a job: the input of the state machine
// (state × trigger → state). Not bus.Event, which is what a job stream carries.
type Trigger uint8

// Job triggers.
const (
	EvDispatch      Trigger = iota // a batch holding the job is offered to a worker
	EvAccepted                     // the worker accepted the batch
	EvRefused                      // the worker answered full/rejected or was not there: the job was never started
	EvAttemptFailed                // the attempt failed and may be retried (report, worker lost, assignment timeout)
	EvRequeue                      // the retry backoff elapsed; the job waits for a worker again
	EvExhausted                    // a retryable failure with no attempts left
	EvCompleted                    // a completed terminal record was seen
	EvFailed                       // a failed terminal record was seen or written (non-retryable)
	EvCancel                       // the job was cancelled
	EvExpire                       // the job's deadline passed
	EvDeadLetter                   // a failure no retry can fix (model unavailable, delivered too often): dead-lettered at once
	numTriggers
)

var eventNames = [...]string{"dispatch", "accepted", "refused", "attempt_failed", "requeue", "exhausted", "completed", "failed", "cancel", "expire", "dead_letter"}

func (e Trigger) String() string {
	if int(e) < len(eventNames) {
		return eventNames[e]
	}
	return fmt.Sprintf("event(%d)", e)
}

// ErrIllegalTransition is matched by every error Transition returns.
var ErrIllegalTransition = errors.New("dispatcher: illegal job transition")

// none marks a missing cell of the table; it is never a real state.
const none = numStates

// transitions is THE job lifecycle: transitions[state][event] is the next state,
// or none when the event is illegal in that state. Every state change of a job
// goes through Transition, which reads only this table.
//
// Why some cells exist: a result may be seen in any live state (the worker that
// ran an earlier attempt, or another dispatcher, may have finished it); a worker
// may itself end a running job as expired; a queued or retrying job is never on a
// worker, so only it can be expired by a dispatcher.
var transitions = func() [numStates][numTriggers]State {
	var t [numStates][numTriggers]State
	for s := range t {
		for e := range t[s] {
			t[s][e] = none
		}
	}
	set := func(e Trigger, to State, from ...State) {
		for _, f := range from {
			t[f][e] = to
		}
	}
	set(EvDispatch, StateDispatched, StateQueued)
	set(EvAccepted, StateRunning, StateDispatched)
	set(EvRefused, StateQueued, StateDispatched)
	set(EvAttemptFailed, StateRetrying, StateDispatched, StateRunning)
	set(EvRequeue, StateQueued, StateRetrying)
	set(EvExhausted, StateDeadLettered, StateRetrying)
	set(EvCompleted, StateCompleted, StateQueued, StateDispatched, StateRunning, StateRetrying)
	set(EvFailed, StateFailed, StateQueued, StateDispatched, StateRunning, StateRetrying)
	set(EvCancel, StateCancelled, StateQueued, StateDispatched, StateRunning, StateRetrying)
	set(EvExpire, StateExpired, StateQueued, StateDispatched, StateRunning, StateRetrying)
	set(EvDeadLetter, StateDeadLettered, StateQueued, StateDispatched, StateRunning, StateRetrying)
	return t
}()

// Transition returns the state after event e in state s, or an error matching
// ErrIllegalTransition.
func Transition(s State, e Trigger) (State, error) {
	if s >= numStates || e >= numTriggers {
		return s, fmt.Errorf("%w: %v on %v", ErrIllegalTransition, e, s)
	}
	to := transitions[s][e]
	if to == none {
		return s, fmt.Errorf("%w: %v on %v", ErrIllegalTransition, e, s)
	}
	return to, nil
}

// eventForStatus maps a terminal record's status to the event it causes.
func eventForStatus(status string) (Trigger, bool) {
	switch status {
	case "completed":
		return EvCompleted, true
	case "failed":
		return EvFailed, true
	case "cancelled":
		return EvCancel, true
	case "expired":
		return EvExpire, true
	}
	return 0, false
}
