package metrics_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/dispatcher"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/metrics"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/mlx-serving/mlx-serving/worker"
)

// TestRealWork runs the real parts — embedded JetStream, a dispatcher, a worker
// with the Python runtime on the tiny model — with every collector in one
// registry served over HTTP as --metrics-addr does, and scrapes it: jobs queued
// before any capacity show as queue depth, then drain; the terminal counts, TTFT
// and tokens/s per model, batch counters, worker hooks and heartbeats all move.
// Mutation caught: the routed-by-reason series left out of the dispatcher's
// Collect ("0 batches routed").
func TestRealWork(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{WorkerTTL: 3 * time.Second})
	ctx := testenv.Context(t, 3*time.Minute)
	log := testenv.Logger(t)

	reg := metrics.NewRegistry()
	fleet, err := metrics.NewFleet(metrics.FleetOptions{Conn: b.Conn, MinInterval: time.Nanosecond, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	if err := fleet.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fleet.Stop)
	reg.MustRegister(fleet)
	srv, err := metrics.Listen("127.0.0.1:0", metrics.Handler(reg))
	if err != nil {
		t.Fatal(err)
	}
	sctx, stopSrv := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(sctx) }()
	t.Cleanup(func() {
		stopSrv()
		if err := <-served; err != nil {
			t.Errorf("metrics server: %v", err)
		}
	})
	s := &scraper{t: t, url: "http://" + srv.Addr() + "/metrics"}

	// Jobs wait in JOBS while there is no capacity.
	prod, err := bus.NewClient(b.Conn)
	if err != nil {
		t.Fatal(err)
	}
	const jobs = 3
	ids := make([]string, jobs)
	for i := range ids {
		ack, err := prod.Submit(ctx, &schemas.JobRequest{Model: "tiny", Prompt: fmt.Sprintf("story %d", i), MaxTokens: 8})
		if err != nil {
			t.Fatal(err)
		}
		ids[i] = ack.JobID
	}
	s.waitFor(ctx,
		expectation{"mlx_fleet_queue_depth", L("priority", "normal"), jobs},
		expectation{"mlx_fleet_workers", L("state", "ready"), 0},
	)

	// Capacity arrives.
	wobs, err := metrics.NewWorker(reg, "mac-a")
	if err != nil {
		t.Fatal(err)
	}
	w, err := worker.New(worker.Config{
		WorkerID: "mac-a", Conn: testenv.Connect(t, b.Server.ClientURL()), Python: testenv.Python(t),
		Models: []string{"tiny=" + testenv.TinyModel(t)}, Slots: 2,
		HeartbeatInterval: 200 * time.Millisecond, Observer: wobs, Logger: log,
	})
	if err != nil {
		t.Fatal(err)
	}
	wctx, stopW := context.WithCancel(context.Background())
	wdone := make(chan struct{})
	go func() { defer close(wdone); _ = w.Run(wctx) }()
	t.Cleanup(func() { stopW(); <-wdone })

	dlog := log.With().Str("component", "dispatcher").Logger()
	dobs, err := metrics.NewDispatcher(reg)
	if err != nil {
		t.Fatal(err)
	}
	d, err := dispatcher.New(dispatcher.Config{
		DispatcherID: "d1", Conn: testenv.Connect(t, b.Server.ClientURL()), WorkerTTL: 3 * time.Second, Logger: &dlog,
		Observer: dobs,
	})
	if err != nil {
		t.Fatal(err)
	}
	dctx, stopD := context.WithCancel(context.Background())
	ddone := make(chan struct{})
	go func() { defer close(ddone); _ = d.Run(dctx) }()
	t.Cleanup(func() { stopD(); <-ddone })

	for _, id := range ids {
		for {
			r, err := prod.Result(ctx, id)
			if err == nil {
				if r.Status != schemas.StatusCompleted {
					t.Fatalf("job %s ended %s: %+v", id, r.Status, r.Error)
				}
				break
			}
			select {
			case <-ctx.Done():
				t.Fatalf("job %s has no result: %v", id, err)
			case <-time.After(50 * time.Millisecond):
			}
		}
	}

	mfs := s.waitFor(ctx,
		expectation{"mlx_fleet_queue_depth", L("priority", "normal"), 0},
		expectation{"mlx_fleet_jobs_finished_total", L("status", "completed", "model", "tiny"), jobs},
		expectation{"mlx_fleet_job_ttft_seconds", L("model", "tiny"), jobs},
		expectation{"mlx_fleet_job_tokens_per_second", L("model", "tiny"), jobs},
		expectation{"mlx_fleet_job_attempts", nil, jobs},
		expectation{"mlx_fleet_workers", L("state", "ready"), 1},
		expectation{"mlx_fleet_worker_slots", L("worker_id", "mac-a"), 2},
		expectation{"mlx_fleet_worker_in_flight", L("worker_id", "mac-a"), 0},
		expectation{"mlx_dispatcher_jobs_assigned_total", nil, jobs},
		expectation{"mlx_dispatcher_jobs_finished_total", L("state", "completed"), jobs},
		expectation{"mlx_dispatcher_retries_total", nil, 0},
		expectation{"mlx_worker_jobs_started_total", L("worker_id", "mac-a", "model", "tiny"), jobs},
		expectation{"mlx_worker_jobs_finished_total", L("worker_id", "mac-a", "model", "tiny", "status", "completed"), jobs},
		expectation{"mlx_worker_in_flight", L("worker_id", "mac-a"), 0},
		expectation{"mlx_worker_slots", L("worker_id", "mac-a"), 2},
		expectation{"mlx_worker_state", L("worker_id", "mac-a", "state", "ready"), 1},
		expectation{"mlx_worker_breaker_state", L("worker_id", "mac-a", "state", "closed"), 1},
		expectation{"mlx_worker_runtime_starts_total", L("worker_id", "mac-a", "result", "ok"), 1},
		expectation{"mlx_worker_runtime_restarts_total", L("worker_id", "mac-a"), 0},
	)
	// Batches: at least one, at most one per job, and the worker saw the same
	// accepted assignments the dispatcher counted.
	batches, _ := value(mfs, "mlx_dispatcher_batches_total", nil)
	if batches < 1 || batches > jobs {
		t.Fatalf("batches %v for %d jobs", batches, jobs)
	}
	// Every batch sent was routed for one reason (refused offers are routed again).
	routed := 0.0
	for _, r := range dispatcher.RouteReasons() {
		v, _ := value(mfs, "mlx_dispatcher_batches_routed_total", L("reason", r.String()))
		routed += v
	}
	if routed < batches {
		t.Fatalf("%v batches routed, %v accepted", routed, batches)
	}
	if got, _ := value(mfs, "mlx_worker_batch_size", L("worker_id", "mac-a")); got != batches {
		t.Fatalf("worker saw %v accepted batches, dispatcher %v", got, batches)
	}
	if got, _ := value(mfs, "mlx_fleet_completion_tokens_total", L("model", "tiny")); got < jobs {
		t.Fatalf("completion tokens %v", got)
	}
	if _, ok := mfs["go_goroutines"]; !ok {
		t.Fatal("the Go collector is missing from the registry")
	}
}
