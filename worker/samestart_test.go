package worker

import (
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// An assignment names the process it is for (the started_at of the heartbeats
// its dispatcher follows): a process of the same worker id that started at
// another time does not answer it at all, so of two processes under one id
// — one paused past the TTL and resumed beside its replacement — only the
// one the dispatcher follows runs the batch. Before, both ran every job (red
// team round 17, F1: 12 of 12 streams mixed two texts). An assignment naming
// this process, or none, is answered as before.
// Mutation caught: handleAssign without the started_at check (the
// assignment for another process is accepted).
func TestAssignmentForAnotherProcessIsNotAnswered(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, realConfig(t, b, "w-same"), true)

	other := a.startedAt.Add(-time.Minute)
	m := batch("tiny", newJob("for another process", 3))
	m.WorkerStartedAt = &other
	data, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.nc.Request(subjects.Assign(a.ID()), data, time.Second); !errors.Is(err, nats.ErrTimeout) {
		t.Fatalf("assignment for another process: %v, want no answer (timeout)", err)
	}
	if n := a.notForMe.Load(); n != 1 {
		t.Errorf("not-for-me count %d, want 1", n)
	}
	mine := a.startedAt
	m = batch("tiny", newJob("for this process", 3))
	m.WorkerStartedAt = &mine
	if rep := assign(t, b.nc, a.ID(), m); rep.Status != schemas.AssignAccepted {
		t.Fatalf("assignment for this process: %+v", rep)
	}
	if rep := assign(t, b.nc, a.ID(), batch("tiny", newJob("for any process", 3))); rep.Status != schemas.AssignAccepted {
		t.Fatalf("assignment naming no process: %+v", rep)
	}
}

// On stop a worker deletes its registry entry only while it is its own: a
// process paused past the TTL and stopped beside its replacement deleted the
// replacement's entry, and dispatchers took the live worker for lost (red
// team round 17, F1: 2 of 8 of its jobs retried).
// Mutation caught: deleteHeartbeat without the started_at check.
func TestStopLeavesAnotherProcesssEntry(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	cfg := testConfig(t, b, "w-entry")
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.nc, a.js, a.startedAt = b.nc, b.js, time.Now().UTC() // what Start sets; no loop runs
	ctx := within(t, 10*time.Second)
	other := schemas.HeartbeatMsg{WorkerID: "w-entry", State: schemas.WorkerReady, StartedAt: a.startedAt.Add(time.Minute)}
	if err := registry.Put(ctx, b.js, other); err != nil {
		t.Fatal(err)
	}
	a.deleteHeartbeat(ctx)
	hb, ok, err := registry.Get(ctx, b.js, "w-entry")
	if err != nil || !ok || !hb.StartedAt.Equal(other.StartedAt) {
		t.Fatalf("the other process's entry after this one's stop: %+v ok %v err %v", hb, ok, err)
	}
	own := schemas.HeartbeatMsg{WorkerID: "w-entry", State: schemas.WorkerReady, StartedAt: a.startedAt}
	if err := registry.Put(ctx, b.js, own); err != nil {
		t.Fatal(err)
	}
	a.deleteHeartbeat(ctx)
	if _, ok, err := registry.Get(ctx, b.js, "w-entry"); err != nil || ok {
		t.Fatalf("this process's own entry after its stop: present %v err %v", ok, err)
	}
}

// A process whose registry entry was taken over by a later process of its
// worker id (it was paused past the TTL, or asleep) stops at its next
// heartbeat and leaves the other's entry alone: heart-beating on, the two
// overwrote each other's entry, and a dispatcher starting meanwhile placed
// jobs on the old one (red team round 17, F1). Its own writes answered late
// or an older process's write are written over (TestHeartbeatTakesBackAn-
// OlderEntry).
// Mutation caught: putHeartbeat without the started_at comparison (the old
// process writes on, and never stops).
func TestReplacedProcessStops(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, testConfig(t, b, "w-replaced"), false)
	ctx := within(t, 20*time.Second)
	waitHeartbeat(t, b.kv, "w-replaced", 10*time.Second, func(h *schemas.HeartbeatMsg) bool { return h.StartedAt.Equal(a.startedAt) })
	later := a.Heartbeat() // schema-valid, another process's start
	later.Hostname, later.StartedAt = "new", a.startedAt.Add(time.Minute)
	if err := registry.Put(ctx, b.js, later); err != nil {
		t.Fatal(err)
	}
	select {
	case <-a.Stopped():
	case <-ctx.Done():
		t.Fatal("the replaced process did not stop")
	}
	if err := a.StopErr(); !errors.Is(err, ErrWorkerIDInUse) {
		t.Errorf("stopped with %v, want ErrWorkerIDInUse (the CLI's exit status)", err)
	}
	hb, ok, err := registry.Get(ctx, b.js, "w-replaced")
	if err != nil || !ok || !hb.StartedAt.Equal(later.StartedAt) {
		t.Fatalf("the later process's entry after the old one stopped: %+v ok %v err %v", hb, ok, err)
	}
}

// Which process of an id stays is the server's order, not the hosts' clocks:
// an entry another process wrote after this one's stops this one even when
// that process's start time reads earlier (its host's clock behind). Compared
// by start times, a resumed process on a host whose clock was ahead stopped
// its live replacement instead (red team round 18, operator F4).
// Mutation caught: putHeartbeat stopping only for a later start time (this
// process writes over the other's entry and runs on).
func TestHeartbeatOfAnotherProcessStopsThisOneWhateverItsClock(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, testConfig(t, b, "w-skewed"), false)
	ctx := within(t, 20*time.Second)
	waitHeartbeat(t, b.kv, "w-skewed", 10*time.Second, func(h *schemas.HeartbeatMsg) bool { return h.StartedAt.Equal(a.startedAt) })
	behind := a.Heartbeat()
	behind.Hostname, behind.StartedAt = "other", a.startedAt.Add(-time.Minute)
	if err := registry.Put(ctx, b.js, behind); err != nil {
		t.Fatal(err)
	}
	select {
	case <-a.Stopped():
	case <-ctx.Done():
		t.Fatal("a process whose entry another process wrote after it ran on")
	}
	hb, ok, err := registry.Get(ctx, b.js, "w-skewed")
	if err != nil || !ok || hb.Hostname != "other" {
		t.Fatalf("entry after this process stopped: %+v ok %v err %v; want the other process's", hb, ok, err)
	}
}

// A heartbeat that finds its entry changed writes over it only as it read it:
// a later process's claim landing between that read and the write stays, and
// the old process then stops (red team round 18, R-L1).
// Mutation caught: putHeartbeat's rewrite unconditional (PutAt rev 0): the
// later claim is wiped.
func TestHeartbeatRewriteKeepsALaterClaim(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	cfg := testConfig(t, b, "w-rewrite")
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.js = b.js // what Start sets; the heartbeat loop is not run here
	ctx := within(t, 20*time.Second)
	reg, err := registry.Open(ctx, b.js)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.putHeartbeat(ctx, reg); err != nil {
		t.Fatal(err)
	}
	// This process's own entry written again (its write whose answer was
	// lost): the revision it holds is stale, so its next beat reads first.
	if err := registry.Put(ctx, b.js, a.Heartbeat()); err != nil {
		t.Fatal(err)
	}
	later := a.Heartbeat()
	later.Hostname, later.StartedAt = "new", a.startedAt.Add(time.Minute)
	a.beforeRewrite = func() {
		if err := registry.Put(ctx, b.js, later); err != nil {
			t.Error(err)
		}
	}
	if err := a.putHeartbeat(ctx, reg); err == nil {
		t.Fatal("the beat over a claim made after its read succeeded")
	}
	a.beforeRewrite = nil
	hb, ok, err := registry.Get(ctx, b.js, "w-rewrite")
	if err != nil || !ok || !hb.StartedAt.Equal(later.StartedAt) {
		t.Fatalf("entry after the beat: %+v ok %v err %v; want the later process's", hb, ok, err)
	}
	if err := a.putHeartbeat(ctx, reg); !errors.Is(err, errSuperseded) {
		t.Fatalf("next beat: %v, want errSuperseded", err)
	}
}
