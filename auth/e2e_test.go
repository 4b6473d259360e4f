package auth

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/dispatcher"
	"github.com/mlx-serving/mlx-serving/gateway"
	"github.com/mlx-serving/mlx-serving/gateway/gatewaybus"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/mlx-serving/mlx-serving/worker"
)

// TestEveryRoleWorksWithItsOwnGrantsOnly runs the real system with each part
// connected as its role: a dispatcher, a worker with the real runtime, the
// gateway and a producer. A grant missing from any role's list shows up here as
// a job that never completes or a permission violation.
func TestEveryRoleWorksWithItsOwnGrantsOnly(t *testing.T) {
	t.Parallel()
	sb := startSecureBus(t)
	log := testenv.Logger(t)

	disp := sb.connect(RoleDispatcher, "")
	dlog := log.With().Str("part", "dispatcher").Logger()
	d, err := dispatcher.New(dispatcher.Config{DispatcherID: "d1", Conn: disp.nc, WorkerTTL: 3 * time.Second, Logger: &dlog})
	if err != nil {
		t.Fatal(err)
	}
	run(t, d.Run)

	wk := sb.connect(RoleWorker, "w1")
	a, err := worker.New(worker.Config{
		WorkerID: "w1", Conn: wk.nc, Python: testenv.Python(t),
		Models: []string{"tiny=" + testenv.TinyModel(t)}, Slots: 2,
		HeartbeatInterval: 500 * time.Millisecond,
		Logger:            log.With().Str("part", "worker").Logger(),
	})
	if err != nil {
		t.Fatal(err)
	}
	run(t, a.Run)
	if err := a.WaitReady(testenv.Context(t, 2*time.Minute)); err != nil {
		t.Fatal(err)
	}

	ctx := testenv.Context(t, 2*time.Minute)
	prodConn := sb.connect(RoleProducer, "a")
	p, err := bus.NewClient(prodConn.nc, bus.WithTenant("a"), bus.WithDefaultModel("tiny"))
	if err != nil {
		t.Fatal(err)
	}
	stream, _, err := bus.SubmitStream(ctx, p, prodConn.nc, &schemas.JobRequest{Prompt: "hello", MaxTokens: 4}, bus.StreamOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	var res *schemas.ResultMsg
	for ev, err := range stream.Events(ctx) {
		if err != nil {
			t.Fatal(err)
		}
		res = ev.Result
	}
	if res == nil || res.Status != schemas.StatusCompleted {
		t.Fatalf("producer's job ended %+v", res)
	}

	gw := sb.connect(RoleGateway, "")
	gwLog := log.With().Str("part", "gateway").Logger()
	gb, err := gatewaybus.New(gw.nc, gatewaybus.Options{DefaultModel: "tiny", Logger: gwLog})
	if err != nil {
		t.Fatal(err)
	}
	g, err := gateway.New(gateway.Config{Jobs: gb, Fleet: gb.Fleet(), Logger: gwLog, DefaultModel: "tiny"})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(g.Handler())
	t.Cleanup(hs.Close)
	for _, path := range []string{"/readyz", "/v1/models"} {
		resp, err := http.Get(hs.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("gateway %s: %d", path, resp.StatusCode)
		}
	}
	resp, err := http.Post(hs.URL+"/v1/chat/completions", "application/json",
		strings.NewReader(`{"model":"tiny","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("gateway chat completion: %d %v", resp.StatusCode, body)
	}

	// A second process under w1's id, with w1's credential, reads w1's entry
	// and does not start (worker/idclaim.go): the grant to read its own entry.
	// Mutation caught: the worker's direct get of its own entry left out of
	// PermissionsFor (the read is refused and the second process starts).
	wk2 := sb.connect(RoleWorker, "w1")
	a2, err := worker.New(worker.Config{WorkerID: "w1", Conn: wk2.nc, Python: testenv.Python(t),
		Models: []string{"tiny=" + testenv.TinyModel(t)}, Slots: 2, HeartbeatInterval: 500 * time.Millisecond,
		Logger: log.With().Str("part", "worker2").Logger()})
	if err != nil {
		t.Fatal(err)
	}
	if err := a2.Start(ctx); !errors.Is(err, worker.ErrWorkerIDInUse) {
		if err == nil {
			_ = a2.Shutdown(ctx)
		}
		t.Fatalf("a second w1 process started: %v, want ErrWorkerIDInUse", err)
	}

	for name, c := range map[string]*client{"dispatcher": disp, "worker": wk, "producer": prodConn, "gateway": gw} {
		select {
		case err := <-c.errs:
			t.Errorf("%s got an async error: %v", name, err)
		default:
		}
	}
}

// run runs a part until the test ends.
func run(t *testing.T, f func(context.Context) error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = f(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
}
