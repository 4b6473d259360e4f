package worker

import (
	"errors"
	"testing"
)

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
