package chaos

import (
	"context"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"
)

// TestNATSKilledWhileWorkersRun SIGKILLs the single NATS server (sync_interval:
// always, from ops/nats/standalone.conf) while the workers are running jobs
// and writing results, and brings it back on the same store after a short,
// seeded outage; the dispatcher and workers keep running and must ride it out.
// Afterwards every accepted job has exactly one terminal record: 0 lost, 0
// duplicated. TestOutageReplay only kills NATS while no worker runs, and the
// campaign kills NATS only in cluster mode, where a replica keeps the streams.
//
// What goes wrong here if anything does: a result published just before the
// kill reaches the dispatcher on core NATS but is never stored, and the
// dispatcher acks the job (lost unless the worker's retried write lands); a
// worker whose result write failed gives up before the server is back; a
// job's ack is lost with the server, the job is delivered again, and runs
// again after its terminal (duplicate terminal events on the reply subject).
//
// Short: 2 kills (part of `go test ./...`). CHAOS_FULL=1: 6. CHAOS_ROUNDS and
// CHAOS_SEED override.
func TestNATSKilledWhileWorkersRun(t *testing.T) {
	rounds, seed := killConfig(t, 2, 6)
	const batch = 60
	t.Logf("NATS kills under load: %d rounds of %d jobs, seed %d (replay with CHAOS_SEED=%d)", rounds, batch, seed, seed)
	natsBin, mlxBin := binaries(t)
	runDir := keepOnFailure(t, "mlx-chaos-natskill-")
	ns := startStandalone(t, natsBin, runDir, filepath.Join(runDir, "nats-store"))
	checkSyncAlways(t, ns.nodes[0])
	ctx := testContext(t, 5*time.Minute+time.Duration(rounds)*time.Minute)

	f := newFleet(t, runDir, ns, 10, 4)
	f.addDispatcher(ctx, "d1")
	f.addWorker(ctx, "w1")
	f.addWorker(ctx, "w2")
	l := newLedger(t, ns, f.modelID(), seed)
	rng := rand.New(rand.NewPCG(seed, seed^0x2545f4914f6cdd1d))
	doneAtKill := map[int]int{}
	n := ns.nodes[0]

	for r := range rounds {
		// The producer's connection must be back before the batch, or the
		// first submits fail for a reason that is not under test.
		if err := poll(ctx, 50*time.Millisecond, l.nc.IsConnected); err != nil {
			t.Fatalf("round %d: producer not reconnected: %v", r, err)
		}
		k := 5 + rng.IntN(36)
		down := time.Duration(200+rng.IntN(2800)) * time.Millisecond
		fire := l.whenResults(r, k)
		subCtx, stopSubmit := context.WithCancel(ctx)
		submitted := make(chan struct{})
		subRng := rand.New(rand.NewPCG(seed, uint64(r)))
		go func() { defer close(submitted); l.submitBatch(subCtx, r, batch, subRng, nil) }()
		select {
		case <-fire:
		case <-time.After(2 * time.Minute):
			f.dumpLogs(20)
			t.Fatalf("round %d: %d RESULTS writes never came", r, k)
		}
		n.kill()
		stopSubmit() // what was not submitted by now is not part of the batch
		<-submitted
		done, acc := l.snapshotDone(r)
		doneAtKill[r] = done
		t.Logf("round %d: SIGKILL nats after %d result writes of the batch (%d/%d accepted jobs had one), down %s",
			r, k, done, acc, down)
		pause(ctx, down) // the outage itself: fault injection, not synchronization
		if err := n.restart(ctx); err != nil {
			t.Fatalf("round %d: %v", r, err)
		}
		for _, p := range append(append([]*proc(nil), f.dispatchers...), workerProcs(f)...) {
			if !p.running() {
				t.Errorf("round %d: %s exited while NATS was down (it must reconnect):\n%s", r, p.name, p.tail(20))
			}
		}
	}
	if err := restartStack(ctx, f); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	dctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	err := l.drain(dctx)
	cancel()
	t.Logf("drained in %s (%v)", time.Since(start).Round(time.Millisecond), err)
	finishKillTest(ctx, t, l, f, mlxBin, doneAtKill)
}

func workerProcs(f *fleet) []*proc {
	var out []*proc
	for _, w := range f.workers {
		out = append(out, w.proc)
	}
	return out
}
