package main

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// up stops starting as soon as a component stops or the store fails, not only
// when the worker's readiness wait ends: a worker whose id another process
// claimed had stopped, and up waited the readiness wait's 5 minutes (red team
// round 23). Mutation caught: awaitStart without its errs case: it blocks on
// ready, which never comes here: red after 10 s.
func TestUpStopsStartingWhenAComponentStops(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	claimed := errors.New("worker: worker id in use by another process")
	cases := []struct {
		name    string
		errs    error
		failed  string
		want    error
		wantAny bool
	}{
		{name: "the worker stopped", errs: claimed, want: claimed},
		{name: "a component returned nil early", errs: nil, wantAny: true},
		{name: "the store failed", failed: "critical write error", wantAny: true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ready := make(chan error) // never ready
			errs, failed := make(chan error, 1), make(chan string, 1)
			if c.failed != "" {
				failed <- c.failed
			} else {
				errs <- c.errs
			}
			stop, why := awaitWithin(t, ctx, ready, errs, failed)
			if !stop || why == nil || (c.want != nil && !errors.Is(why, c.want)) {
				t.Fatalf("awaitStart: stop %v, %v; want a stop with why", stop, why)
			}
		})
	}
	ready := make(chan error, 1)
	ready <- nil
	if stop, why := awaitWithin(t, ctx, ready, make(chan error), make(chan string)); stop || why != nil {
		t.Fatalf("a ready worker: stop %v, %v; want up to go on", stop, why)
	}
}

// awaitWithin is awaitStart, failing the test if it has not returned in 10 s.
func awaitWithin(t *testing.T, ctx context.Context, ready, errs <-chan error, failed <-chan string) (bool, error) {
	t.Helper()
	type answer struct {
		stop bool
		why  error
	}
	done := make(chan answer, 1)
	go func() {
		stop, why := awaitStart(ctx, ready, errs, failed, zerolog.Nop())
		done <- answer{stop, why}
	}()
	select {
	case a := <-done:
		return a.stop, a.why
	case <-time.After(10 * time.Second):
		t.Fatal("awaitStart still waiting after 10 s")
		return false, nil
	}
}
