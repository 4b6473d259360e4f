package chaos

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
)

// campaignConfig sizes a fault campaign.
type campaignConfig struct {
	jobs, producers, inFlight int
	span                      time.Duration // submissions are spread over this long
	maxTokens                 [2]int        // each job's max_tokens, uniform in [min, max]
	cluster                   bool          // three NATS servers, one of which is killed now and then
	seed                      uint64
	faultGap                  [2]time.Duration // pause between faults, uniform
	faultsUntil               float64          // faults stop once this share of jobs has a terminal
	drain                     time.Duration    // how long the final drain may take
	maxAttempts               int
	slots                     int
}

func shortCampaign() campaignConfig {
	return campaignConfig{jobs: 200, producers: 4, inFlight: 8, span: time.Minute, maxTokens: [2]int{8, 32},
		faultGap: [2]time.Duration{time.Second, 3 * time.Second}, faultsUntil: 0.9,
		drain: 2 * time.Minute, maxAttempts: 10, slots: 4}
}

func fullCampaign() campaignConfig {
	return campaignConfig{jobs: 1000, producers: 5, inFlight: 12, span: 8 * time.Minute, maxTokens: [2]int{8, 32}, cluster: true,
		faultGap: [2]time.Duration{time.Second, 4 * time.Second}, faultsUntil: 0.95,
		drain: 15 * time.Minute, maxAttempts: 10, slots: 4}
}

// campaignFromEnv: CHAOS_FULL=1 selects the full campaign; CHAOS_JOBS,
// CHAOS_SPAN (submission period), CHAOS_CLUSTER (0/1) and CHAOS_SEED override.
func campaignFromEnv(t *testing.T) campaignConfig {
	c := shortCampaign()
	if os.Getenv("CHAOS_FULL") == "1" {
		c = fullCampaign()
	}
	if v := os.Getenv("CHAOS_JOBS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("CHAOS_JOBS=%q", v)
		}
		c.jobs = n
	}
	if v := os.Getenv("CHAOS_SPAN"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("CHAOS_SPAN=%q", v)
		}
		c.span = d
	}
	if v := os.Getenv("CHAOS_CLUSTER"); v != "" {
		c.cluster = v == "1"
	}
	c.seed = uint64(time.Now().UnixNano())
	if v := os.Getenv("CHAOS_SEED"); v != "" {
		s, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("CHAOS_SEED=%q", v)
		}
		c.seed = s
	}
	return c
}

// TestFaultCampaign submits jobs from several producers while a seeded fault
// injector SIGKILLs workers, runtimes, dispatchers and (cluster mode) NATS
// servers, then checks that every job ended in exactly one terminal record,
// that nothing ran again after completing, and that every caller's stream was
// gap-free or marked.
//
// Mutation caught: dispatcher/registry.go retryJobsOn made a no-op (a job on a
// killed worker never continues elsewhere): CHAOS_SEED=7 short campaign red
// with 1 lost job and 1 left in JOBS, green without the mutation. Only a
// worker kill that hits a running job exercises it, so with the tiny model's
// short jobs a smaller campaign (60 jobs) can pass with the mutation.
func TestFaultCampaign(t *testing.T) {
	cfg := campaignFromEnv(t)
	t.Logf("fault campaign: %d jobs, cluster=%v, seed %d (replay with CHAOS_SEED=%d)", cfg.jobs, cfg.cluster, cfg.seed, cfg.seed)
	natsBin, _ := binaries(t)
	runDir := keepOnFailure(t, "mlx-chaos-campaign-")

	var ns *natsSet
	if cfg.cluster {
		ns = startCluster(t, natsBin, runDir)
	} else {
		ns = startStandalone(t, natsBin, runDir, runDir+"/nats-store")
	}
	f := newFleet(t, runDir, ns, cfg.maxAttempts, cfg.slots)
	setup := testContext(t, 5*time.Minute)
	if cfg.cluster {
		// What an operator provisions for a cluster; the dispatchers provision
		// again at start (see the replicas check below).
		if err := jsprov.Provision(setup, f.js, jsprov.Options{Replicas: 3}); err != nil {
			t.Fatal(err)
		}
	}
	f.addDispatcher(setup, "d1")
	f.addDispatcher(setup, "d2")
	for i := 1; i <= 3; i++ {
		f.addWorker(setup, fmt.Sprintf("w%d", i))
	}
	if cfg.cluster {
		checkReplicas(t, setup, f.js, 3)
	}

	h := newHistory()
	h.monitor(t, connectAll(t, ns, "chaos-monitor"))

	rng := rand.New(rand.NewPCG(cfg.seed, cfg.seed^0x9e3779b97f4a7c15))
	tokens := make([]int, cfg.jobs)
	for i := range tokens {
		tokens[i] = cfg.maxTokens[0] + rng.IntN(cfg.maxTokens[1]-cfg.maxTokens[0]+1)
	}

	start := time.Now()
	runCtx, stopRun := context.WithCancel(context.Background())
	defer stopRun()
	var producers sync.WaitGroup
	per := (cfg.jobs + cfg.producers - 1) / cfg.producers
	for k := range cfg.producers {
		n := min(per, cfg.jobs-k*per)
		if n <= 0 {
			break
		}
		nc := connectAll(t, ns, fmt.Sprintf("chaos-producer-%d", k))
		p, err := bus.NewClient(nc)
		if err != nil {
			t.Fatal(err)
		}
		base := k * per
		pr := &producer{idx: k, nc: nc, p: p, h: h, model: f.modelID(), inFlight: cfg.inFlight,
			tokens: func(i int) int { return tokens[base+i] }, prefix: fmt.Sprintf("c%d", cfg.seed%100000),
			opts: bus.StreamOptions{QuietAfter: 2 * time.Second}, span: cfg.span}
		producers.Add(1)
		go func() { defer producers.Done(); pr.run(runCtx, n) }()
	}
	producersDone := make(chan struct{})
	go func() { producers.Wait(); close(producersDone) }()

	inj := &injector{t: t, f: f, start: h.start, rng: rand.New(rand.NewPCG(cfg.seed+1, cfg.seed)), cfg: cfg, counts: map[string]int{}}
	faultCtx, stopFaults := context.WithCancel(context.Background())
	injDone := make(chan struct{})
	go func() { defer close(injDone); inj.run(faultCtx) }()

	// Faults go on until most jobs finished, then the final drain: everything
	// runs again and every job gets its terminal, or the drain deadline passes.
	_ = poll(runCtx, 200*time.Millisecond, func() bool {
		select {
		case <-producersDone:
			return true
		default:
		}
		return float64(h.done.Load()) >= cfg.faultsUntil*float64(cfg.jobs)
	})
	stopFaults()
	<-injDone
	inj.restoreAll(testContext(t, 3*time.Minute))
	t.Logf("faults stopped after %s with %d/%d terminals; draining", time.Since(start).Round(time.Second), h.done.Load(), cfg.jobs)
	select {
	case <-producersDone:
	case <-time.After(cfg.drain):
		t.Errorf("drain deadline (%s) passed with %d/%d terminals", cfg.drain, h.done.Load(), cfg.jobs)
		stopRun()
		<-producersDone
	}

	// The binaries' ack wait is 30s: an ack lost to a fault is redone within it.
	rep, err := check(testContext(t, 3*time.Minute), f.js, h, inj.snapshot(), 75*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	rep.duration = time.Since(start)
	t.Logf("seed %d summary:\n%s", cfg.seed, rep.table())
	for _, b := range inj.bugs() {
		t.Errorf("fault injector found: %s", b)
	}
	for _, fl := range rep.failures() {
		t.Error(fl)
	}
	if cfg.cluster {
		checkReplicas(t, testContext(t, time.Minute), f.js, 3)
	}
	if t.Failed() {
		f.dumpLogs(15)
		t.Logf("replay with CHAOS_SEED=%d; process logs kept in %s", cfg.seed, runDir)
	}
}

// injector applies a seeded random schedule of faults, one at a time.
type injector struct {
	t   testing.TB
	f   *fleet
	rng *rand.Rand
	cfg campaignConfig

	start time.Time // the history's start, so fault times match the checker's

	mu      sync.Mutex
	counts  map[string]int
	found   []string
	skipped int
}

func (in *injector) since() time.Duration { return time.Since(in.start).Round(time.Millisecond) }

func (in *injector) count(kind string) {
	in.mu.Lock()
	in.counts[kind]++
	in.mu.Unlock()
}

func (in *injector) bug(format string, args ...any) {
	in.mu.Lock()
	in.found = append(in.found, fmt.Sprintf(format, args...))
	in.mu.Unlock()
}

func (in *injector) snapshot() map[string]int {
	in.mu.Lock()
	defer in.mu.Unlock()
	out := map[string]int{}
	for k, v := range in.counts {
		out[k] = v
	}
	return out
}

func (in *injector) bugs() []string {
	in.mu.Lock()
	defer in.mu.Unlock()
	return append([]string(nil), in.found...)
}

func (in *injector) dur(r [2]time.Duration) time.Duration {
	return r[0] + time.Duration(in.rng.Int64N(int64(r[1]-r[0])+1))
}

// pause waits d or until ctx ends (the schedule's deliberate downtime).
func pause(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func (in *injector) run(ctx context.Context) {
	kinds := []string{"worker-kill", "worker-kill", "worker-kill", "runtime-kill", "runtime-kill", "runtime-kill", "dispatcher-restart", "dispatcher-restart"}
	if in.cfg.cluster {
		kinds = append(kinds, "nats-kill", "nats-kill")
	}
	for pause(ctx, in.dur(in.cfg.faultGap)) {
		kind := kinds[in.rng.IntN(len(kinds))]
		// The operation itself is not cut short by ctx: a fault half applied
		// would leave the fleet in a state restoreAll has to guess at.
		opCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Minute)
		in.apply(opCtx, kind)
		cancel()
	}
}

func (in *injector) apply(ctx context.Context, kind string) {
	f := in.f
	switch kind {
	case "worker-kill":
		w := f.workers[in.rng.IntN(len(f.workers))]
		// Half the kills come back under the same id before the worker TTL
		// (10s) runs out, half after it, so both ways of noticing a dead worker
		// are exercised.
		down := in.dur([2]time.Duration{500 * time.Millisecond, 3 * time.Second})
		if in.rng.IntN(2) == 0 {
			down = in.dur([2]time.Duration{11 * time.Second, 14 * time.Second})
		}
		rt := w.runtimePID()
		in.t.Logf("fault at %s: SIGKILL worker %s (runtime %d), down %s", in.since(), w.id, rt, down)
		w.kill()
		in.count(kind)
		pause(ctx, down)
		if rt != 0 {
			// The orphaned runtime must notice (EOF on stdin) and exit by itself.
			gctx, cancel := context.WithTimeout(ctx, 15*time.Second)
			if err := waitGone(gctx, rt); err != nil {
				in.bug("runtime %d of SIGKILLed worker %s still running 15s later (orphan)", rt, w.id)
				_ = syscall.Kill(rt, syscall.SIGKILL)
			}
			cancel()
		}
		if err := f.startWorker(ctx, w); err != nil {
			in.bug("worker %s did not come back: %v", w.id, err)
		}
	case "runtime-kill":
		w := f.workers[in.rng.IntN(len(f.workers))]
		rt := w.runtimePID()
		if rt == 0 {
			in.skipped++
			return
		}
		in.t.Logf("fault at %s: SIGKILL runtime %d of worker %s", in.since(), rt, w.id)
		_ = syscall.Kill(rt, syscall.SIGKILL)
		in.count(kind)
	case "dispatcher-restart":
		d := f.dispatchers[in.rng.IntN(len(f.dispatchers))]
		down := in.dur([2]time.Duration{0, time.Second})
		in.t.Logf("fault at %s: SIGKILL dispatcher %s, restart after %s", in.since(), d.name, down)
		d.kill()
		in.count(kind)
		pause(ctx, down)
		if err := f.startDispatcher(ctx, d); err != nil {
			in.bug("dispatcher %s did not come back: %v", d.name, err)
		}
	case "nats-kill":
		n := f.nats.nodes[in.rng.IntN(len(f.nats.nodes))]
		down := in.dur([2]time.Duration{time.Second, 5 * time.Second})
		in.t.Logf("fault at %s: SIGKILL %s, down %s", in.since(), n.name, down)
		n.kill()
		in.count(kind)
		pause(ctx, down)
		if err := n.restart(ctx); err != nil {
			in.bug("%v", err)
		}
	}
}

// restoreAll starts whatever is down, so the drain runs on the whole fleet.
func (in *injector) restoreAll(ctx context.Context) {
	f := in.f
	for _, n := range f.nats.nodes {
		if !n.running() {
			if err := n.restart(ctx); err != nil {
				in.bug("%v", err)
			}
		}
	}
	for _, d := range f.dispatchers {
		if !d.running() {
			if err := f.startDispatcher(ctx, d); err != nil {
				in.bug("dispatcher %s did not come back: %v", d.name, err)
			}
		}
	}
	for _, w := range f.workers {
		if !w.running() {
			if err := f.startWorker(ctx, w); err != nil {
				in.bug("worker %s did not come back: %v", w.id, err)
			}
		}
	}
}

// checkReplicas fails the test when a stream runs with fewer replicas than the
// cluster was provisioned with.
func checkReplicas(t testing.TB, ctx context.Context, js jetstream.JetStream, want int) {
	t.Helper()
	for _, name := range []string{subjects.StreamJobs, subjects.StreamResults, subjects.StreamDLQ, subjects.StreamCancels} {
		s, err := js.Stream(ctx, name)
		if err != nil {
			t.Errorf("stream %s: %v", name, err)
			continue
		}
		info, err := s.Info(ctx)
		if err != nil {
			t.Errorf("stream %s: %v", name, err)
			continue
		}
		if info.Config.Replicas != want {
			t.Errorf("stream %s has %d replicas, the cluster was provisioned with %d", name, info.Config.Replicas, want)
		}
	}
}

// keepOnFailure makes a run directory that is removed when the test passes
// and kept (its path logged) when it fails, for the process logs.
func keepOnFailure(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if !t.Failed() {
			os.RemoveAll(dir)
		}
	})
	return dir
}

// testContext is bounded by d and cancelled with the test.
func testContext(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
