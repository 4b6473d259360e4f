package chaos

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
)

// TestWholeStackKill is the reviewer's experiment from the issue "Stored, then
// acked", as a test: the whole single-node stack — nats-server from
// ops/nats/standalone.conf (sync_interval: always), a dispatcher, two workers
// with their Python runtimes — runs; a batch of 100 short jobs is submitted;
// while their results are being written, every process is SIGKILLed at once,
// NATS included; everything restarts on the same store dir and the next round
// submits its batch. At the end every job the bus accepted (Submit returned a
// PubAck) must have exactly one terminal record in RESULTS.
//
// The failure it exists for: a dispatcher that acks a job in JOBS as soon as it
// sees the result's publish on core NATS (a core subscriber on mlx.results.>
// receives it before JetStream has stored — let alone fsynced — it) lets the
// ack be stored while the result is not. A kill in that window loses the job:
// no longer in JOBS, no record in RESULTS, no DLQ entry, and nothing will ever
// run it again. The window is short, so the test kills many times and right
// after a result write was seen on the wire, and repeats the round.
//
// Short: 2 rounds (part of `go test ./...`). CHAOS_FULL=1: 10 rounds.
// CHAOS_ROUNDS and CHAOS_SEED override; the seed picks the kill moments, the
// kill order and the jobs' max_tokens.
func TestWholeStackKill(t *testing.T) {
	rounds, seed := killConfig(t, 2, 10)
	const batch = 100
	t.Logf("whole-stack kill: %d rounds of %d jobs, seed %d (replay with CHAOS_SEED=%d)", rounds, batch, seed, seed)
	natsBin, mlxBin := binaries(t)
	runDir := keepOnFailure(t, "mlx-chaos-stackkill-")
	ns := startStandalone(t, natsBin, runDir, filepath.Join(runDir, "nats-store"))
	checkSyncAlways(t, ns.nodes[0])
	ctx := testContext(t, 5*time.Minute+time.Duration(rounds)*time.Minute)

	// max-attempts 10: a job interrupted by several consecutive kills is
	// retried, not dead-lettered (a dead letter would be accounted for, but
	// would not exercise the path under test).
	f := newFleet(t, runDir, ns, 10, 4)
	f.addDispatcher(ctx, "d1") // provisions the streams
	f.addWorker(ctx, "w1")
	f.addWorker(ctx, "w2")
	l := newLedger(t, ns, f.modelID(), seed)
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	doneAtKill := map[int]int{}

	for r := range rounds {
		if r > 0 {
			start := time.Now()
			if err := restartStack(ctx, f); err != nil {
				f.dumpLogs(20)
				t.Fatalf("round %d: %v", r, err)
			}
			t.Logf("round %d: stack restarted on the same store in %s", r, time.Since(start).Round(time.Millisecond))
		}
		// The kill comes right after the k-th RESULTS write of this batch, plus
		// a jitter: some of the batch has finished, the rest is in flight or
		// queued, and a result has just been published.
		k := 5 + rng.IntN(76)
		jitter := time.Duration(rng.Int64N(int64(15 * time.Millisecond)))
		fire := l.whenResults(r, k)

		subCtx, stopSubmit := context.WithCancel(ctx)
		started, submitted := make(chan struct{}), make(chan struct{})
		subRng := rand.New(rand.NewPCG(seed, uint64(r)))
		go func() { defer close(submitted); l.submitBatch(subCtx, r, batch, subRng, started) }()
		var first time.Time
		select {
		case <-started:
			first = time.Now()
		case <-ctx.Done():
			t.Fatalf("round %d: nothing submitted: %v", r, ctx.Err())
		}
		select {
		case <-fire:
		case <-time.After(2 * time.Minute):
			f.dumpLogs(20)
			t.Fatalf("round %d: %d RESULTS writes never came", r, k)
		}
		pause(ctx, jitter)
		order := killStack(t, f, rng)
		at := time.Since(first)
		stopSubmit()
		<-submitted
		done, acc := l.snapshotDone(r)
		doneAtKill[r] = done
		t.Logf("round %d: SIGKILL %s at %s after the first submit (after %d result writes + %s): %d/%d accepted jobs of the round had a result write",
			r, order, at.Round(time.Millisecond), k, jitter.Round(time.Microsecond), done, acc)
		if done == 0 || done == acc {
			t.Logf("round %d: the kill did not land between the round's first and last result (%d/%d); the next rounds still count", r, done, acc)
		}
	}

	// Everything back up, then every job gets its terminal or is found lost.
	if err := restartStack(ctx, f); err != nil {
		f.dumpLogs(20)
		t.Fatal(err)
	}
	start := time.Now()
	dctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	err := l.drain(dctx)
	cancel()
	t.Logf("drained in %s (%v)", time.Since(start).Round(time.Millisecond), err)
	finishKillTest(ctx, t, l, f, mlxBin, doneAtKill)
}

// finishKillTest is the common end of the kill tests: verify every round,
// report, check JOBS is empty and that `status` agrees.
func finishKillTest(ctx context.Context, t *testing.T, l *ledger, f *fleet, mlxBin string, doneAtFault map[int]int) {
	t.Helper()
	rs, err := l.verify(ctx, doneAtFault)
	if err != nil {
		t.Fatal(err)
	}
	l.report(rs)
	if n, err := streamMsgs(ctx, l.js, subjects.StreamJobs); err != nil || n != 0 {
		t.Errorf("JOBS holds %d messages (%v) after the drain: stuck", n, err)
	}
	l.checkStatus(ctx, mlxBin, f.nats)
	if t.Failed() {
		f.dumpLogs(15)
		t.Logf("replay with CHAOS_SEED=%d; process logs kept in %s", l.seed, f.runDir)
	}
}

// killStack SIGKILLs every process of the stack — nats-servers, dispatchers,
// workers and the workers' runtimes — in one tight loop, in a seeded random
// order, before waiting for any of them: no process gets to react to another's
// death (a dispatcher flushing its acks as NATS goes, a worker retrying its
// result), as when a machine loses power or `kill -9` hits a process group.
// It returns the order, for the log.
func killStack(t testing.TB, f *fleet, rng *rand.Rand) string {
	t.Helper()
	type victim struct {
		name string
		pid  int
	}
	var vs []victim
	var procs []*proc
	for _, n := range f.nats.nodes {
		vs, procs = append(vs, victim{n.name, n.pid()}), append(procs, n.proc)
	}
	for _, d := range f.dispatchers {
		vs, procs = append(vs, victim{d.name, d.pid()}), append(procs, d)
	}
	var runtimes []int
	for _, w := range f.workers {
		vs, procs = append(vs, victim{w.name, w.pid()}), append(procs, w.proc)
		if rt := w.runtimePID(); rt != 0 {
			vs = append(vs, victim{w.name + "-runtime", rt})
			runtimes = append(runtimes, rt)
		}
	}
	rng.Shuffle(len(vs), func(i, j int) { vs[i], vs[j] = vs[j], vs[i] })
	var names []string
	for _, v := range vs {
		if v.pid != 0 {
			_ = syscall.Kill(v.pid, syscall.SIGKILL)
			names = append(names, v.name)
		}
	}
	for _, p := range procs {
		p.kill() // already dead: this only reaps
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	for _, rt := range runtimes {
		if err := waitGone(ctx, rt); err != nil {
			t.Errorf("runtime %d survived SIGKILL: %v", rt, err)
		}
	}
	return strings.Join(names, ", ")
}

// restartStack starts whatever is down, NATS first (on its store dir), then
// the dispatchers, then the workers in parallel, each waited for until it
// works: healthy, consuming, ready.
func restartStack(ctx context.Context, f *fleet) error {
	for _, n := range f.nats.nodes {
		if !n.running() {
			if err := n.restart(ctx); err != nil {
				return err
			}
		}
	}
	for _, d := range f.dispatchers {
		if !d.running() {
			if err := f.startDispatcher(ctx, d); err != nil {
				return err
			}
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, len(f.workers))
	for i, w := range f.workers {
		if w.running() {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f.startWorker(ctx, w); err != nil {
				errs[i] = fmt.Errorf("worker %s: %w", w.id, err)
			}
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}
