package dispatcher

import (
	"errors"
	"testing"
)

// legal is the lifecycle written out by hand, independently of the table.
var legal = map[State]map[Trigger]State{
	StateQueued:     {EvDispatch: StateDispatched, EvCompleted: StateCompleted, EvFailed: StateFailed, EvCancel: StateCancelled, EvExpire: StateExpired, EvDeadLetter: StateDeadLettered},
	StateDispatched: {EvAccepted: StateRunning, EvRefused: StateQueued, EvAttemptFailed: StateRetrying, EvCompleted: StateCompleted, EvFailed: StateFailed, EvCancel: StateCancelled, EvExpire: StateExpired, EvDeadLetter: StateDeadLettered},
	StateRunning:    {EvAttemptFailed: StateRetrying, EvCompleted: StateCompleted, EvFailed: StateFailed, EvCancel: StateCancelled, EvExpire: StateExpired, EvDeadLetter: StateDeadLettered},
	StateRetrying:   {EvRequeue: StateQueued, EvExhausted: StateDeadLettered, EvCompleted: StateCompleted, EvFailed: StateFailed, EvCancel: StateCancelled, EvExpire: StateExpired, EvDeadLetter: StateDeadLettered},
}

func TestTransitionTableWalk(t *testing.T) {
	t.Parallel()
	legalCount := 0
	for s := State(0); s < numStates; s++ {
		for e := Trigger(0); e < numTriggers; e++ {
			want, ok := legal[s][e]
			got, err := Transition(s, e)
			if ok {
				legalCount++
				if err != nil || got != want {
					t.Errorf("%v --%v--> got (%v, %v), want %v", s, e, got, err, want)
				}
				continue
			}
			if !errors.Is(err, ErrIllegalTransition) {
				t.Errorf("%v --%v--> got %v, want illegal", s, e, got)
			}
			if got != s {
				t.Errorf("illegal %v --%v--> changed state to %v", s, e, got)
			}
		}
	}
	if legalCount != 27 {
		t.Errorf("walked %d legal transitions, want 27", legalCount)
	}
	for s := StateCompleted; s < numStates; s++ {
		if !s.Terminal() {
			t.Errorf("%v not terminal", s)
		}
	}
	if _, err := Transition(numStates, EvDispatch); !errors.Is(err, ErrIllegalTransition) {
		t.Errorf("out of range state accepted")
	}
}

// TestIllegalTransitionsCounted drives a job through the dispatcher's apply, the
// one place states change, and checks illegal events are refused and counted.
func TestIllegalTransitionsCounted(t *testing.T) {
	t.Parallel()
	d := &Dispatcher{}
	d.log = *testConfigLogger()
	j := &job{id: "x", state: StateQueued}
	path := []Trigger{EvDispatch, EvAccepted, EvAttemptFailed, EvRequeue, EvDispatch, EvRefused, EvDispatch, EvAccepted, EvCompleted}
	for _, e := range path {
		if err := d.apply(j, e); err != nil {
			t.Fatalf("apply %v: %v", e, err)
		}
	}
	if j.state != StateCompleted || d.onWorker != 0 {
		t.Fatalf("state %v onWorker %d", j.state, d.onWorker)
	}
	samples := []struct {
		s State
		e Trigger
	}{{StateCompleted, EvDispatch}, {StateQueued, EvAccepted}, {StateRunning, EvDispatch}, {StateQueued, EvRequeue}, {StateDeadLettered, EvCancel}, {StateRunning, EvExhausted}, {StateQueued, EvAttemptFailed}}
	for _, c := range samples {
		j.state = c.s
		if err := d.apply(j, c.e); !errors.Is(err, ErrIllegalTransition) || j.state != c.s {
			t.Errorf("%v + %v: err %v state %v", c.s, c.e, err, j.state)
		}
	}
	if got := d.metrics.IllegalTransitions.Load(); got != int64(len(samples)) {
		t.Errorf("IllegalTransitions = %d, want %d", got, len(samples))
	}
	if got := d.metrics.TransitionCount(StateQueued, EvDispatch); got != 3 {
		t.Errorf("queued+dispatch counted %d, want 3", got)
	}
	if d.metrics.Completed.Load() != 1 {
		t.Errorf("Completed = %d", d.metrics.Completed.Load())
	}
}

// TestWeightedFairNoStarvation proves the selection: with every priority
// backlogged, picks follow 4:2:1 exactly over each cycle of 7 and the longest
// wait of low between two picks is one cycle.
func TestWeightedFairNoStarvation(t *testing.T) {
	t.Parallel()
	r := wrr{w: [3]int{4, 2, 1}}
	all := [3]bool{true, true, true}
	var count [3]int
	lastLow, maxGap := -1, 0
	for i := range 700 {
		p := r.pick(all)
		r.commit(p, all)
		count[p]++
		if p == 2 {
			maxGap = max(maxGap, i-lastLow)
			lastLow = i
		}
		if i%7 == 6 {
			if want := [3]int{4, 2, 1}; [3]int{count[0] * 7 / (i + 1), count[1] * 7 / (i + 1), count[2] * 7 / (i + 1)} != want {
				t.Fatalf("after %d picks counts %v", i+1, count)
			}
		}
	}
	if count != [3]int{400, 200, 100} || maxGap > 7 {
		t.Fatalf("counts %v, longest low gap %d", count, maxGap)
	}
	// An ineligible (empty) priority gives its turns to the others.
	r = wrr{w: [3]int{4, 2, 1}}
	some := [3]bool{false, true, true}
	count = [3]int{}
	for range 30 {
		p := r.pick(some)
		r.commit(p, some)
		count[p]++
	}
	if count != [3]int{0, 20, 10} {
		t.Fatalf("with high empty: %v", count)
	}
}
