package worker

import (
	"errors"
	"testing"
	"time"
)

var (
	allBreakerStates = []BreakerState{BreakerClosed, BreakerOpen, BreakerHalfOpen}
	allBreakerEvents = []BreakerEvent{BreakerFailure, BreakerTrip, BreakerCooldown, BreakerSuccess}
)

// Walk every state × event: the legal ones land where the table says, every other
// one is rejected and leaves the state alone.
func TestBreakerTable(t *testing.T) {
	t.Parallel()
	want := map[BreakerState]map[BreakerEvent]BreakerState{
		BreakerClosed:   {BreakerFailure: BreakerClosed, BreakerTrip: BreakerOpen, BreakerSuccess: BreakerClosed},
		BreakerOpen:     {BreakerCooldown: BreakerHalfOpen},
		BreakerHalfOpen: {BreakerSuccess: BreakerClosed, BreakerFailure: BreakerOpen, BreakerTrip: BreakerOpen},
	}
	for _, s := range allBreakerStates {
		for _, ev := range allBreakerEvents {
			b := NewBreaker(BreakerOptions{})
			b.state = s
			got, err := b.Fire(ev)
			next, legal := want[s][ev]
			if legal {
				if err != nil || got != next || b.State() != next {
					t.Errorf("%s --%s--> got %s (%v), want %s", s, ev, got, err, next)
				}
				continue
			}
			if !errors.Is(err, ErrIllegalTransition) || b.State() != s {
				t.Errorf("%s --%s--> must be illegal, got %s (%v)", s, ev, got, err)
			}
		}
	}
}

func TestBreakerOpensAfterThresholdWithinWindow(t *testing.T) {
	t.Parallel()
	now := time.Unix(1000, 0)
	b := NewBreaker(BreakerOptions{Threshold: 3, Window: 10 * time.Second, Now: func() time.Time { return now }})
	step := func(d time.Duration, want BreakerState) {
		t.Helper()
		now = now.Add(d)
		got, err := b.RecordFailure()
		if err != nil || got != want {
			t.Fatalf("after failure at +%s: %s (%v), want %s", d, got, err, want)
		}
	}
	step(0, BreakerClosed)
	step(5*time.Second, BreakerClosed)
	// The first failure has left the window: two within it.
	step(6*time.Second, BreakerClosed)
	step(time.Second, BreakerOpen)
	if _, err := b.RecordFailure(); !errors.Is(err, ErrIllegalTransition) {
		t.Fatalf("a failure while open is not an event the breaker takes: %v", err)
	}
	if s, _ := b.Fire(BreakerCooldown); s != BreakerHalfOpen {
		t.Fatalf("cooldown: %s", s)
	}
	// The probe fails: open again at once, below the threshold.
	step(time.Millisecond, BreakerOpen)
	b.Fire(BreakerCooldown)
	if s, _ := b.Fire(BreakerSuccess); s != BreakerClosed {
		t.Fatalf("probe success: %s", s)
	}
	// Closing from half-open forgets the old failures.
	step(time.Millisecond, BreakerClosed)
	step(time.Millisecond, BreakerClosed)
	step(time.Millisecond, BreakerOpen)
}

func TestLifecycleTable(t *testing.T) {
	t.Parallel()
	states := []State{StateStarting, StateReady, StateBusy, StateUnavailable, StateDraining, StateStopped}
	events := []Event{EventRuntimeUp, EventRuntimeDown, EventJobsStarted, EventJobsIdle, EventDrain, EventStop}
	want := map[State]map[Event]State{
		StateStarting:    {EventRuntimeUp: StateReady, EventRuntimeDown: StateUnavailable, EventDrain: StateDraining, EventStop: StateStopped},
		StateReady:       {EventJobsStarted: StateBusy, EventJobsIdle: StateReady, EventRuntimeUp: StateReady, EventRuntimeDown: StateUnavailable, EventDrain: StateDraining, EventStop: StateStopped},
		StateBusy:        {EventJobsStarted: StateBusy, EventJobsIdle: StateReady, EventRuntimeUp: StateBusy, EventRuntimeDown: StateUnavailable, EventDrain: StateDraining, EventStop: StateStopped},
		StateUnavailable: {EventRuntimeUp: StateReady, EventRuntimeDown: StateUnavailable, EventJobsStarted: StateUnavailable, EventJobsIdle: StateUnavailable, EventDrain: StateDraining, EventStop: StateStopped},
		StateDraining:    {EventRuntimeUp: StateDraining, EventRuntimeDown: StateDraining, EventJobsStarted: StateDraining, EventJobsIdle: StateDraining, EventDrain: StateDraining, EventStop: StateStopped},
		StateStopped:     {},
	}
	hb := map[State]string{StateStarting: "unavailable", StateReady: "ready", StateBusy: "ready", StateUnavailable: "unavailable", StateDraining: "draining", StateStopped: "draining"}
	for _, s := range states {
		if got := heartbeatState(s); got != hb[s] {
			t.Errorf("heartbeat state of %s: %s, want %s", s, got, hb[s])
		}
		for _, ev := range events {
			l := newLifecycle()
			l.state = s
			_, changed := l.watch()
			got, err := l.fire(ev)
			next, legal := want[s][ev]
			if !legal {
				if !errors.Is(err, ErrIllegalTransition) || l.get() != s {
					t.Errorf("%s --%s--> must be illegal, got %s (%v)", s, ev, got, err)
				}
				continue
			}
			if err != nil || got != next {
				t.Errorf("%s --%s--> got %s (%v), want %s", s, ev, got, err, next)
			}
			select {
			case <-changed:
				if next == s {
					t.Errorf("%s --%s--> signalled a change without one", s, ev)
				}
			default:
				if next != s {
					t.Errorf("%s --%s--> changed without a signal", s, ev)
				}
			}
		}
	}
}
