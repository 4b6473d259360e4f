package jsprov_test

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jserr"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

func cancelsConfig(ctx context.Context, t *testing.T, js jetstream.JetStream) jetstream.StreamConfig {
	t.Helper()
	s, err := js.Stream(ctx, subjects.StreamCancels)
	if err != nil {
		t.Fatal(err)
	}
	return s.CachedInfo().Config
}

func wantBoundedCancels(t *testing.T, c jetstream.StreamConfig) {
	t.Helper()
	if c.MaxMsgSize != jsprov.DefaultCancelsMaxMsgSize || c.MaxMsgs != jsprov.DefaultCancelsMaxMsgs ||
		c.MaxBytes != jsprov.DefaultCancelsMaxBytes || c.Discard != jetstream.DiscardNew || c.MaxMsgsPerSubject != 1 {
		t.Errorf("CANCELS: max msg size %d, max msgs %d, max bytes %d, discard %v, per subject %d; want %d, %d, %d, new, 1",
			c.MaxMsgSize, c.MaxMsgs, c.MaxBytes, c.Discard, c.MaxMsgsPerSubject,
			jsprov.DefaultCancelsMaxMsgSize, jsprov.DefaultCancelsMaxMsgs, jsprov.DefaultCancelsMaxBytes)
	}
}

// publishCancel stores body on tenant t1's cancel subject for id; the error is
// the bus's (jserr.Map), as a producer's Cancel returns it.
func publishCancel(ctx context.Context, js jetstream.JetStream, id string, body []byte) error {
	_, err := js.Publish(ctx, subjects.Cancel("t1", id), body, jetstream.WithExpectStream(subjects.StreamCancels))
	return jserr.Map(err, "cancel "+id)
}

// TestCancelsAreBounded: one producer credential cannot fill the disk through
// CANCELS (red-team F2): a cancel larger than a cancel can be is refused, and
// past the stream's limits a new cancel is refused — the ones stored before
// stay (discard-new), and a repeated cancel of a stored job still replaces it.
// Mutations caught: dropping MaxMsgSize (the oversized cancel is stored);
// Discard back to DiscardOld (the fourth cancel pushes out the first).
func TestCancelsAreBounded(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 20*time.Second)
	wantBoundedCancels(t, cancelsConfig(ctx, t, b.JS))

	big := bytes.Repeat([]byte("x"), jsprov.DefaultCancelsMaxMsgSize+1)
	if err := publishCancel(ctx, b.JS, "big", big); !errors.Is(err, jserr.ErrTooLarge) {
		t.Fatalf("oversized cancel: %v, want ErrTooLarge", err)
	}
	if n := b.StreamMsgs(t, subjects.StreamCancels); n != 0 {
		t.Fatalf("CANCELS holds %d messages after an oversized cancel, want 0", n)
	}

	if err := jsprov.Provision(ctx, b.JS, jsprov.Options{CancelsMaxMsgs: 3}); err != nil {
		t.Fatal(err)
	}
	body := []byte(`{"job_id":"x","requested_at":"2026-01-01T00:00:00Z"}`)
	for _, id := range []string{"a", "b", "c"} {
		if err := publishCancel(ctx, b.JS, id, body); err != nil {
			t.Fatalf("cancel %s: %v", id, err)
		}
	}
	if err := publishCancel(ctx, b.JS, "d", body); !errors.Is(err, jserr.ErrStreamFull) {
		t.Fatalf("cancel past MaxMsgs: %v, want ErrStreamFull", err)
	}
	if err := publishCancel(ctx, b.JS, "a", body); err != nil {
		t.Fatalf("repeated cancel of a stored job on a full stream: %v", err)
	}
	s, err := b.JS.Stream(ctx, subjects.StreamCancels)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"a", "b", "c"} {
		if _, err := s.GetLastMsgForSubject(ctx, subjects.Cancel("t1", id)); err != nil {
			t.Errorf("cancel %s stored before the stream filled: %v", id, err)
		}
	}
}

// TestCancelsBoundsApplyOnUpgrade: a CANCELS made by an earlier version
// (unbounded, discard-old) gets the bounds when provisioned again, keeping the
// cancels it holds. Mutation caught: skipping CANCELS in Provision's loop.
func TestCancelsBoundsApplyOnUpgrade(t *testing.T) {
	t.Parallel()
	js := testenv.StartJetStream(t)
	ctx := testenv.Context(t, 20*time.Second)
	old := jetstream.StreamConfig{
		Name: subjects.StreamCancels, Subjects: []string{subjects.CancelAll}, Retention: jetstream.LimitsPolicy,
		MaxMsgs: -1, MaxBytes: -1, MaxAge: 24 * time.Hour, MaxMsgsPerSubject: 1, Discard: jetstream.DiscardOld,
		Duplicates: 2 * time.Minute,
	}
	if _, err := js.CreateStream(ctx, old); err != nil {
		t.Fatal(err)
	}
	big := bytes.Repeat([]byte("x"), jsprov.DefaultCancelsMaxMsgSize+1)
	if err := publishCancel(ctx, js, "before", big); err != nil {
		t.Fatalf("the old config stores a large cancel: %v", err)
	}
	if err := jsprov.Provision(ctx, js, jsprov.Options{}); err != nil {
		t.Fatal(err)
	}
	wantBoundedCancels(t, cancelsConfig(ctx, t, js))
	if err := publishCancel(ctx, js, "after", big); !errors.Is(err, jserr.ErrTooLarge) {
		t.Fatalf("oversized cancel after the upgrade: %v, want ErrTooLarge", err)
	}
	s, err := js.Stream(ctx, subjects.StreamCancels)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetLastMsgForSubject(ctx, subjects.Cancel("t1", "before")); err != nil {
		t.Errorf("the cancel stored before the upgrade: %v", err)
	}
}
