package chaos

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/dispatcher"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/worker"
)

// A three-server JetStream cluster formed from ops/nats, streams with three
// replicas: the server leading JOBS is SIGKILLed while jobs are submitted and
// run, stays down a while, and comes back on its store. Every job still ends
// in exactly one terminal record.
func TestClusterLosesNothing(t *testing.T) {
	natsBin, _ := binaries(t)
	runDir := keepOnFailure(t, "mlx-chaos-cluster-")
	ns := startCluster(t, natsBin, runDir)
	ctx := testContext(t, 5*time.Minute)

	nc := connectAll(t, ns, "cluster-control")
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	const ttl = 3 * time.Second
	if err := jsprov.Provision(ctx, js, jsprov.Options{Replicas: 3, WorkerTTL: ttl}); err != nil {
		t.Fatal(err)
	}
	checkReplicas(t, ctx, js, 3)
	for _, n := range ns.nodes {
		checkSyncAlways(t, n)
	}

	log := testenv.Logger(t)
	dlog := log.With().Str("dispatcher", "d1").Logger()
	d, err := dispatcher.New(dispatcher.Config{DispatcherID: "d1", Conn: connectAll(t, ns, "cluster-d1"),
		WorkerTTL: ttl, AckWait: 6 * time.Second, BackoffInitial: 50 * time.Millisecond, BackoffMax: time.Second, Logger: &dlog})
	if err != nil {
		t.Fatal(err)
	}
	runInBackground(t, func(ctx context.Context) { _ = d.Run(ctx) })
	model := testenv.TinyModel(t)
	a, err := worker.New(worker.Config{WorkerID: "cw1", Conn: connectAll(t, ns, "cluster-w1"), Python: testenv.Python(t),
		Models: []string{"tiny=" + model}, Slots: 4, HeartbeatInterval: 500 * time.Millisecond,
		Logger: log.With().Str("worker", "cw1").Logger()})
	if err != nil {
		t.Fatal(err)
	}
	runInBackground(t, func(ctx context.Context) { _ = a.Run(ctx) })
	if err := a.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}

	h := newHistory()
	const jobs = 120
	pnc := connectAll(t, ns, "cluster-producer")
	p, err := bus.NewClient(pnc)
	if err != nil {
		t.Fatal(err)
	}
	pr := &producer{nc: pnc, p: p, h: h, model: "tiny", inFlight: 8, prefix: "cl",
		tokens: func(i int) int { return 8 + i%16 }, span: 30 * time.Second,
		opts: bus.StreamOptions{QuietAfter: time.Second}}
	runCtx, stopRun := context.WithTimeout(context.Background(), 4*time.Minute)
	defer stopRun()
	done := make(chan struct{})
	go func() { defer close(done); pr.run(runCtx, jobs) }()

	// Kill the JOBS leader once a third of the jobs finished; keep it down while
	// submissions and work go on.
	if err := poll(ctx, 100*time.Millisecond, func() bool { return h.done.Load() >= jobs/3 }); err != nil {
		t.Fatal(err)
	}
	victim := leaderNode(t, ctx, js, ns, subjects.StreamJobs)
	before := h.done.Load()
	t.Logf("SIGKILL %s (JOBS leader) with %d/%d terminals", victim.name, before, jobs)
	victim.kill()
	// Work must go on without it: a few more jobs finish while it is down.
	if err := poll(ctx, 100*time.Millisecond, func() bool { return h.done.Load() >= before+10 }); err != nil {
		t.Fatalf("no progress with %s down: %v", victim.name, err)
	}
	t.Logf("%d terminals with %s down; restarting it", h.done.Load()-before, victim.name)
	if err := victim.restart(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-runCtx.Done():
		t.Errorf("callers still waiting: %d/%d terminals", h.done.Load(), jobs)
		<-done
	}
	rep, err := check(ctx, js, h, map[string]int{"nats-kill": 1}, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("summary:\n%s", rep.table())
	for _, f := range rep.failures() {
		t.Error(f)
	}
	checkReplicas(t, ctx, js, 3)
	if rep.jobs != jobs {
		t.Errorf("%d callers recorded, want %d", rep.jobs, jobs)
	}
	if t.Failed() {
		for _, n := range ns.nodes {
			t.Logf("--- %s\n%s", n.name, n.tail(15))
		}
	}
}

// The dispatcher binary provisions the streams at start. Against a cluster
// provisioned with three replicas it must not scale them down.
func TestDispatcherKeepsClusterReplicas(t *testing.T) {
	natsBin, _ := binaries(t)
	runDir := keepOnFailure(t, "mlx-chaos-replicas-")
	ns := startCluster(t, natsBin, runDir)
	ctx := testContext(t, 2*time.Minute)
	f := newFleet(t, runDir, ns, 3, 4)
	if err := jsprov.Provision(ctx, f.js, jsprov.Options{Replicas: 3}); err != nil {
		t.Fatal(err)
	}
	f.addDispatcher(ctx, "d1")
	checkReplicas(t, ctx, f.js, 3)
}

// leaderNode is the server leading stream name.
func leaderNode(t testing.TB, ctx context.Context, js jetstream.JetStream, ns *natsSet, name string) *natsNode {
	t.Helper()
	s, err := js.Stream(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.Cluster == nil {
		t.Fatalf("stream %s has no cluster info", name)
	}
	for _, n := range ns.nodes {
		if n.name == info.Cluster.Leader {
			return n
		}
	}
	t.Fatalf("leader %q of %s is none of the servers", info.Cluster.Leader, name)
	return nil
}

// runInBackground runs f until the test ends, then cancels it and waits.
func runInBackground(t testing.TB, f func(ctx context.Context)) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); f(ctx) }()
	t.Cleanup(func() { cancel(); wg.Wait() })
}
