package worker

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A second process under a live worker's id does not start: it would take
// every assignment offered to the id too, and run every job twice.
// Mutation caught: start without its claimID call (the second agent starts).
func TestSecondProcessUnderALiveWorkerIDDoesNotStart(t *testing.T) {
	b := startBus(t, 0)
	cfg := fakeConfig(t, b, "w-dup", 0)
	cfg.HeartbeatInterval = 200 * time.Millisecond
	startAgent(t, cfg, true)

	second, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = second.Start(ctx)
	if err == nil {
		_ = second.Shutdown(ctx)
		t.Fatal("a second process under a live worker id started")
	}
	if !errors.Is(err, ErrWorkerIDInUse) {
		t.Fatalf("start: %v, want ErrWorkerIDInUse", err)
	}
}

// The entry of a process that died without deleting it (SIGKILL) does not keep
// its successor from starting under the same id.
// Mutation caught: claimID taking any entry for a live process (no revision
// comparison: the successor is refused).
func TestWorkerStartsOverADeadProcessEntry(t *testing.T) {
	b := startBus(t, 0)
	cfg := fakeConfig(t, b, "w-dead", 0)
	cfg.HeartbeatInterval = 200 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	putDeadEntry(ctx, t, b, cfg.WorkerID)
	startAgent(t, cfg, true)
}

// Two processes starting under one id at the same moment (a fleet of
// identical images powered on together) both find no live entry; only one
// may start. Each start is held, after its check and before its claim, until
// both have checked, so the two claims race as they do in the field.
// Mutation caught: claimID without the conditional claim (reg.Claim → a plain
// put): both agents start.
func TestSimultaneousStartsUnderOneIDStartOne(t *testing.T) {
	b := startBus(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var checked sync.WaitGroup
	checked.Add(2)
	errs := make(chan error, 2)
	agents := make([]*Agent, 2)
	for i := range agents {
		cfg := fakeConfig(t, b, "w-twin", 0)
		cfg.HeartbeatInterval = 200 * time.Millisecond
		a, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		a.beforeClaim = func() { checked.Done(); checked.Wait() }
		agents[i] = a
	}
	for _, a := range agents {
		go func() { errs <- a.Start(ctx) }()
	}
	started, refused := 0, 0
	for range agents {
		switch err := <-errs; {
		case err == nil:
			started++
		case errors.Is(err, ErrWorkerIDInUse):
			refused++
		default:
			t.Fatalf("start: %v", err)
		}
	}
	for _, a := range agents {
		_ = a.Shutdown(ctx)
	}
	if started != 1 || refused != 1 {
		t.Fatalf("%d started, %d refused; want one of each", started, refused)
	}
}

// A dead process's entry that expires while the start waits to see it
// written again does not make the claim fail as if another process had
// claimed the id: the claim is made against what the second read found (no
// entry), not the first (red team round 23: `up` restarted after a SIGKILL
// refused to start its worker, "claimed by another process starting at the
// same moment"). Mutation caught: claiming against the first read's
// revision: ErrWorkerIDInUse.
func TestWorkerStartsOverAnEntryThatExpiresWhileItWaits(t *testing.T) {
	b := startBus(t, time.Second)
	cfg := fakeConfig(t, b, "w-expiring", 0)
	cfg.HeartbeatInterval = time.Second // claimWait 2.5 s: the 1 s entry expires within it
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	putDeadEntry(ctx, t, b, cfg.WorkerID)
	startAgent(t, cfg, true)
}

// putDeadEntry writes what a killed process leaves: its last heartbeat,
// written once, fresh.
func putDeadEntry(ctx context.Context, t *testing.T, b *testBus, workerID string) {
	t.Helper()
	now := time.Now().UTC()
	if err := registry.Put(ctx, b.js, schemas.HeartbeatMsg{WorkerID: workerID, Hostname: "h", Platform: "p", Models: []string{"tiny"},
		Slots: 2, State: schemas.WorkerReady, StartedAt: now.Add(-time.Minute), UpdatedAt: now}); err != nil {
		t.Fatal(err)
	}
}
