package breaker

import (
	"errors"
	"testing"
	"time"
)

// Walk every state × event: the legal ones land where the table says, every
// other one is refused and leaves the state alone.
func TestTable(t *testing.T) {
	t.Parallel()
	want := map[State]map[Event]State{
		Closed:   {Success: Closed, Failure: Closed, Trip: Open},
		Open:     {Success: Open, Failure: Open, Trip: Open, Cooldown: HalfOpen},
		HalfOpen: {Success: Closed, Failure: Open, Trip: Open},
	}
	for _, s := range States() {
		for e := range numEvents {
			b := New(Options{})
			b.state = s
			got, err := b.Fire(e, time.Unix(1000, 0))
			next, legal := want[s][e]
			if legal {
				if err != nil || got != next || b.State() != next {
					t.Errorf("%s --%s--> got %s (%v), want %s", s, e, got, err, next)
				}
				continue
			}
			if !errors.Is(err, ErrIllegalTransition) || b.State() != s {
				t.Errorf("%s --%s--> must be illegal, got %s (%v)", s, e, got, err)
			}
		}
	}
	for _, s := range States() {
		if s.String() == "" || s.String()[0] == 's' {
			t.Errorf("unnamed state %d", s)
		}
	}
	if HalfOpen.String() != "half-open" {
		t.Errorf("half-open is exported as %q: metrics and dashboards read this name", HalfOpen)
	}
}

// The worker's runtime breaker: failures within a window, a success while
// closed forgets nothing, the owner fires Cooldown.
func TestOpensAfterThresholdWithinWindow(t *testing.T) {
	t.Parallel()
	now := time.Unix(1000, 0)
	b := New(Options{Threshold: 3, Window: 10 * time.Second})
	step := func(d time.Duration, want State) {
		t.Helper()
		now = now.Add(d)
		if got := b.Record(false, now); got != want {
			t.Fatalf("after failure at +%s: %s, want %s", d, got, want)
		}
	}
	step(0, Closed)
	b.Record(true, now) // a start that passed is no proof: the count stays
	step(5*time.Second, Closed)
	// The first failure has left the window: two within it.
	step(6*time.Second, Closed)
	step(time.Second, Open)
	// A late failure leaves it open.
	step(time.Millisecond, Open)
	if s, _ := b.Fire(Cooldown, now); s != HalfOpen {
		t.Fatalf("cooldown: %s", s)
	}
	// The probe fails: open again at once, below the threshold.
	step(time.Millisecond, Open)
	_, _ = b.Fire(Cooldown, now)
	if s := b.Record(true, now); s != Closed {
		t.Fatalf("probe success: %s", s)
	}
	// Closing from half-open forgets the old failures.
	step(time.Millisecond, Closed)
	step(time.Millisecond, Closed)
	step(time.Millisecond, Open)
}

// The dispatcher's per-worker breaker: consecutive failures, Allow cools it
// down and lets one probe through at a time.
func TestConsecutiveWithProbe(t *testing.T) {
	t.Parallel()
	now := time.Unix(1000, 0)
	var changes []State
	b := New(Options{Threshold: 3, Consecutive: true, Cooldown: time.Second, OnChange: func(s State) { changes = append(changes, s) }})
	b.Record(false, now)
	b.Record(false, now)
	if b.State() != Closed || !b.Allow(now) {
		t.Fatalf("two failures opened the breaker: %v", b.State())
	}
	b.Record(true, now) // a success resets the count
	for range 2 {
		b.Record(false, now)
	}
	if b.State() != Closed {
		t.Fatalf("count not reset by success")
	}
	b.Record(false, now)
	if b.State() != Open || b.Ready(now.Add(500*time.Millisecond)) || b.Allow(now.Add(500*time.Millisecond)) {
		t.Fatalf("3rd failure: state %v, allowed during cool-down", b.State())
	}
	later := now.Add(time.Second)
	if !b.Ready(later) || b.State() != Open {
		t.Fatalf("Ready changed the state or said no after the cool-down: %v", b.State())
	}
	if !b.Allow(later) || b.State() != HalfOpen {
		t.Fatalf("after cool-down: state %v", b.State())
	}
	b.Take()
	if b.Allow(later) || b.Ready(later) {
		t.Fatalf("half-open let a second probe through")
	}
	b.Record(false, later)
	if b.State() != Open || b.Allow(later.Add(time.Millisecond)) {
		t.Fatalf("failed probe: state %v", b.State())
	}
	evenLater := later.Add(time.Second)
	if !b.Allow(evenLater) {
		t.Fatalf("second cool-down did not half-open")
	}
	b.Take()
	b.Record(true, evenLater)
	if b.State() != Closed || !b.Allow(evenLater) {
		t.Fatalf("successful probe: state %v", b.State())
	}
	want := []State{Open, HalfOpen, Open, HalfOpen, Closed}
	if len(changes) != len(want) {
		t.Fatalf("changes %v, want %v", changes, want)
	}
	for i := range want {
		if changes[i] != want[i] {
			t.Fatalf("changes %v, want %v", changes, want)
		}
	}
}
