package main

import (
	"slices"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Which streams status warns about, and what it says a full one does.
// Mutation caught: fillWarnings without its 90% threshold (`l.have <
// 0.9*l.max` → `l.have < l.max`): the 95% row says nothing.
func TestFillWarnings(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name string
		in   streamFill
		want []string
	}{
		{"unbounded", streamFill{Name: "RESULTS", Msgs: 1e9, MaxMsgs: -1, Bytes: 1e12, MaxBytes: -1}, nil},
		{"half full", streamFill{Name: "JOBS", Msgs: 50, MaxMsgs: 100, Bytes: 10, MaxBytes: 1000}, nil},
		{"95% of messages", streamFill{Name: "JOBS", Msgs: 95, MaxMsgs: 100, MaxBytes: -1}, []string{"JOBS is at 95% of its messages limit"}},
		{"full by bytes", streamFill{Name: "DLQ", Msgs: 3, MaxMsgs: -1, Bytes: 1000, MaxBytes: 1000},
			[]string{"DLQ is at 100% of its bytes limit: new dead letters are refused (their jobs still get their records; they cannot be replayed)"}},
		{"full queue", streamFill{Name: "JOBS", Msgs: 100, MaxMsgs: 100, MaxBytes: -1}, []string{"JOBS is at 100% of its messages limit: submits are refused with queue_full"}},
	} {
		if got := fillWarnings([]streamFill{c.in}); !slices.Equal(got, c.want) {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}

// A heartbeat older than the registry's TTL should have expired: status
// calls it stale rather than showing the worker ready (the operator round's
// full disk: "ready", 30 s old, TTL 10 s).
// Judged by the server's store time, not the worker's updated_at: an honest
// worker with a skewed clock is not stale.
// Mutations caught: staleWorkers comparing against 10×ttl (the 30 s row stays
// fresh); staleWorkers reading updated_at (the skewed row is stale).
func TestStaleWorkers(t *testing.T) {
	t.Parallel()
	now := time.Now()
	// "skewed" says an hour ago by its own clock; the server stored it now.
	ws := []registry.Entry{
		{Heartbeat: schemas.HeartbeatMsg{WorkerID: "fresh", UpdatedAt: now}, StoredAt: now.Add(-2 * time.Second)},
		{Heartbeat: schemas.HeartbeatMsg{WorkerID: "stuck", UpdatedAt: now}, StoredAt: now.Add(-30 * time.Second)},
		{Heartbeat: schemas.HeartbeatMsg{WorkerID: "skewed", UpdatedAt: now.Add(-time.Hour)}, StoredAt: now},
	}
	if got := staleWorkers(ws, 10*time.Second, now); !slices.Equal(got, []string{"stuck"}) {
		t.Fatalf("stale %v, want [stuck]", got)
	}
	if got := staleWorkers(ws, 0, now); got != nil {
		t.Fatalf("no TTL known: stale %v, want none", got)
	}
}
