package jsprov_test

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

// TestDLQBoundAppliesOnUpgrade: a DLQ made by an earlier version (no byte
// bound, discard-old) gets the bound and discard-new when provisioned again,
// keeping its letters; the setting changes it in place (red team R3-3).
// Mutation caught: the DLQ's MaxBytes back to -1 (unbounded after the upgrade).
func TestDLQBoundAppliesOnUpgrade(t *testing.T) {
	t.Parallel()
	js := testenv.StartJetStream(t)
	ctx := testenv.Context(t, 20*time.Second)
	old := jetstream.StreamConfig{
		Name: subjects.StreamDLQ, Subjects: []string{subjects.DLQAll}, Retention: jetstream.LimitsPolicy,
		MaxMsgs: -1, MaxBytes: -1, MaxAge: 30 * 24 * time.Hour, Discard: jetstream.DiscardOld, Duplicates: 2 * time.Minute,
	}
	if _, err := js.CreateStream(ctx, old); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, subjects.DLQ("t1", "before"), []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	for _, want := range []int64{jsprov.DefaultDLQMaxBytes, 1 << 20} {
		opts := jsprov.Options{}
		if want != jsprov.DefaultDLQMaxBytes {
			opts.DLQMaxBytes = want
		}
		if err := jsprov.Provision(ctx, js, opts); err != nil {
			t.Fatal(err)
		}
		if c := streamConfig(ctx, t, js, subjects.StreamDLQ); c.MaxBytes != want || c.Discard != jetstream.DiscardNew {
			t.Errorf("DLQ: max bytes %d, discard %v; want %d, new", c.MaxBytes, c.Discard, want)
		}
	}
	s, err := js.Stream(ctx, subjects.StreamDLQ)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetLastMsgForSubject(ctx, subjects.DLQ("t1", "before")); err != nil {
		t.Errorf("the letter stored before the upgrade: %v", err)
	}
}
