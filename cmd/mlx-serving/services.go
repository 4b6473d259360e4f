package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/mlx-serving/mlx-serving/auth"
	"github.com/mlx-serving/mlx-serving/config"
	"github.com/mlx-serving/mlx-serving/dispatcher"
	"github.com/mlx-serving/mlx-serving/gateway"
	"github.com/mlx-serving/mlx-serving/gateway/gatewaybus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/tracing"
	"github.com/mlx-serving/mlx-serving/worker"
)

// tinyModelID is the id the generated tiny model is served under.
const tinyModelID = "tiny"

// modelSpec returns the worker's model list: the configured model, or the tiny
// model, generated into the data dir on first run.
func modelSpec(ctx context.Context, c config.Config, python string, log zerolog.Logger) ([]string, string, error) {
	if c.Model != "" {
		id := filepath.Base(c.Model)
		return []string{id + "=" + c.Model}, id, nil
	}
	dir, err := filepath.Abs(filepath.Join(c.DataDir, "tiny-model"))
	if err != nil {
		return nil, "", err
	}
	if _, err := os.Stat(filepath.Join(dir, "config.json")); err != nil {
		log.Info().Str("dir", dir).Msg("writing the tiny model (first run)")
		cmd := exec.CommandContext(ctx, python, "-m", "mlx_serving_runtime.tinymodel", dir)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return nil, "", fmt.Errorf("generate tiny model with %s: %w", python, err)
		}
	}
	return []string{tinyModelID + "=" + dir}, tinyModelID, nil
}

func workerID(c config.Config) string {
	if c.WorkerID != "" {
		return c.WorkerID
	}
	host, _ := os.Hostname()
	id := make([]rune, 0, len(host))
	for _, r := range host {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '_', r == '-':
			id = append(id, r)
		default:
			id = append(id, '-')
		}
	}
	if len(id) == 0 {
		return "worker"
	}
	if len(id) > 64 {
		id = id[:64]
	}
	return string(id)
}

func pythonPath(c config.Config) string {
	if c.Python != "" {
		return c.Python
	}
	return worker.DefaultPython()
}

func newWorker(c config.Config, nc *nats.Conn, models []string, log zerolog.Logger) (*worker.Agent, error) {
	return worker.New(worker.Config{
		WorkerID: workerID(c),
		Conn:     nc,
		Python:   pythonPath(c),
		Models:   models,
		Slots:    c.Slots,
		// -1 (the default) leaves the choice to the runtime.
		RuntimeArgs: promptCacheArgs(c.PromptCacheBytes),
		// Several heartbeats per TTL, so one late put never expires a live worker.
		HeartbeatInterval: min(time.Second, c.WorkerTTLDuration()/3),
		Version:           version,
		Logger:            log,
		Observer:          workerObserver(workerID(c), log),
	})
}

// promptCacheArgs passes prompt_cache_bytes to the runtime when it is set (>= 0).
func promptCacheArgs(n int64) []string {
	if n < 0 {
		return nil
	}
	return []string{"--prompt-cache-bytes", strconv.FormatInt(n, 10)}
}

func newDispatcher(c config.Config, nc *nats.Conn, log zerolog.Logger) (*dispatcher.Dispatcher, error) {
	obs, err := dispatcherObserver()
	if err != nil {
		return nil, err
	}
	return dispatcher.New(dispatcherConfig(c, nc, &log, obs))
}

// dispatcherConfig is where the settings reach the dispatcher (apart from
// newDispatcher so that a test can see each one arrive).
func dispatcherConfig(c config.Config, nc *nats.Conn, log *zerolog.Logger, obs dispatcher.Observer) dispatcher.Config {
	host, _ := os.Hostname()
	return dispatcher.Config{
		DispatcherID:   fmt.Sprintf("%s-%d", host, os.Getpid()),
		Conn:           nc,
		PlacementKey:   placementKey(c, nc),
		MaxWait:        c.BatchWait(),
		MaxBatch:       c.BatchMaxSize,
		Routing:        c.Routing,
		RouteMaxSkew:   c.RouteMaxSkew,
		MaxAttempts:    c.MaxAttempts,
		WorkerTTL:      c.WorkerTTLDuration(),
		DrainTimeout:   c.DrainTimeout(),
		WriteGrace:     c.WriteGrace(),
		AttemptTimeout: c.AttemptTimeoutDuration(),
		Logger:         log,
		Observer:       obs,
	}
}

func newGateway(c config.Config, nc *nats.Conn, defaultModel string, log zerolog.Logger) (*gateway.Gateway, error) {
	gb, err := gatewaybus.New(nc, gatewaybus.Options{DefaultModel: defaultModel, Logger: log})
	if err != nil {
		return nil, err
	}
	gm := gatewayMetrics()
	return gateway.New(gateway.Config{
		Addr:           c.HTTPAddr,
		Tokens:         c.Tokens(),
		TokenTenants:   c.TokenTenants(),
		CORSOrigins:    c.CORSOriginList(),
		Limits:         tenantLimits(c),
		Jobs:           gb,
		Fleet:          gb.Fleet(),
		Logger:         log,
		DefaultModel:   defaultModel,
		RequestTimeout: c.RequestTimeout(),
		WriteTimeout:   c.WriteTimeout(),
		MaxConns:       c.GatewayMaxConns,
		WorkerTTL:      c.WorkerTTLDuration(),
		// A body larger than any job the bus can carry is refused unread.
		MaxBodyBytes: gateway.BodyLimitFor(nc.MaxPayload()),
		Observer:     gm,
		Metrics:      gatewayMetricsHandler(c),
	})
}

func provisionOptions(c config.Config) jsprov.Options {
	return jsprov.Options{JobsMaxMsgs: c.JobsMaxMsgs, DLQMaxBytes: c.DLQMaxBytes, Replicas: c.Replicas, WorkerTTL: c.WorkerTTLDuration()}
}

// serverCmd is a command configured by every setting.
func serverCmd(use, short string) (*cobra.Command, *settings) {
	cmd := &cobra.Command{Use: use + " [flags]", Short: short, Args: noArgs}
	s := bindSettings(cmd.Flags(), groupSettings, allKeys()...)
	s.complete(cmd)
	return cmd, s
}

func (a *app) upCmd() *cobra.Command {
	cmd, s := serverCmd("up", "run everything on this machine: embedded NATS, dispatcher, worker with its runtime, gateway")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		c, err := s.load()
		if err != nil {
			fmt.Fprintf(a.stderr, "mlx-serving up: %v\n", err)
			return exitWith(exitUsage)
		}
		return exitWith(cmdUp(cmd.Context(), c, a.stdout, a.stderr))
	}
	return cmd
}

func cmdUp(ctx context.Context, c config.Config, stdout, stderr io.Writer) int {
	log := newLogger(c, "up")
	stopTracing, err := startTracing(ctx, "up", c, log)
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving up: %v\n", err)
		return exitUsage
	}
	defer stopTracing()
	if err := up(ctx, c, stdout, log); err != nil {
		log.Error().Err(err).Msg("up failed")
		fmt.Fprintf(stderr, "mlx-serving up: %v\n", err)
		return exitFailed
	}
	return 0
}

// up runs every part in one process and stops them in dependency order on ctx:
// the gateway stops taking requests, the worker drains its running jobs, the
// dispatcher acks what finished, then the bus shuts down.
func up(ctx context.Context, c config.Config, stdout io.Writer, log zerolog.Logger) error {
	if err := os.MkdirAll(c.DataDir, 0o755); err != nil {
		return err
	}
	host, portStr, err := net.SplitHostPort(c.NATSListen)
	if err != nil {
		return fmt.Errorf("nats_listen: %w", err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return fmt.Errorf("nats_listen: %w", err)
	}
	store, err := loadAuth(c)
	if err != nil {
		return err
	}
	sopts := natsserver.Options{
		Host: host, Port: port, StoreDir: filepath.Join(c.DataDir, "jetstream"),
		SyncAlways: c.SyncAlways, ServerName: "mlx-serving-up", JetStreamMaxStore: c.JetStreamMaxStore,
		Logger: newLogger(c, "nats").Level(zerolog.WarnLevel),
		// Queued jobs and records follow the data dir when auth init turns
		// accounts on (JetStream moves to AccountSystem), or they are turned off.
		StoreAccounts: []string{auth.AccountSystem},
	}
	if store != nil {
		if err := store.WriteNATSAuthConf(); err != nil {
			return fmt.Errorf("auth: %w", err)
		}
		sopts.AuthConf, sopts.Account = store.NATSAuthConfPath(), auth.AccountSystem
		log.Info().Str("dir", store.Dir()).Msg("bus authentication on: each part connects as its role")
		if users := store.Regranted(); len(users) > 0 {
			log.Warn().Strs("users", users).Msg("auth/server.json holds the grants of the release that ran auth init; these users get this release's instead")
		}
	}
	srv, err := natsserver.Start(ctx, sopts)
	if err != nil {
		return fmt.Errorf("start NATS: %w", err)
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	c.NATSURL = srv.ClientURL()
	adminCfg, err := asRole(c, store, auth.RoleAdmin, "")
	if err != nil {
		return err
	}
	nc, js, err := connect(ctx, adminCfg, "mlx-serving-up", log)
	if err != nil {
		return err
	}
	defer nc.Close()
	conns := &roleConns{shared: nc}
	defer conns.close()
	wnc, err := conns.conn(ctx, c, store, auth.RoleWorker, workerID(c), log)
	if err != nil {
		return err
	}
	dnc, err := conns.conn(ctx, c, store, auth.RoleDispatcher, "", log)
	if err != nil {
		return err
	}
	gnc, err := conns.conn(ctx, c, store, auth.RoleGateway, "", log)
	if err != nil {
		return err
	}
	if err := jsprov.Provision(ctx, js, provisionOptions(c)); err != nil {
		return fmt.Errorf("provision: %w", err)
	}
	stopMetrics, err := startMetrics(ctx, "up", c.MetricsAddr, nc, log)
	if err != nil {
		return err
	}
	defer stopMetrics()

	python := pythonPath(c)
	models, modelID, err := modelSpec(ctx, c, python, log)
	if err != nil {
		return err
	}
	w, err := newWorker(c, wnc, models, newLogger(c, "worker"))
	if err != nil {
		return err
	}
	d, err := newDispatcher(c, dnc, newLogger(c, "dispatcher"))
	if err != nil {
		return err
	}
	g, err := newGateway(c, gnc, modelID, newLogger(c, "gateway"))
	if err != nil {
		return err
	}
	if err := g.Listen(); err != nil {
		return fmt.Errorf("gateway listen %s: %w", c.HTTPAddr, err)
	}

	// Each part gets its own context so they can be stopped in order.
	wctx, wcancel := context.WithCancel(context.WithoutCancel(ctx))
	dctx, dcancel := context.WithCancel(context.WithoutCancel(ctx))
	gctx, gcancel := context.WithCancel(context.WithoutCancel(ctx))
	defer wcancel()
	defer dcancel()
	defer gcancel()
	errs := make(chan error, 3)
	wdone, ddone, gdone := make(chan struct{}), make(chan struct{}), make(chan struct{})
	go func() { defer close(wdone); errs <- wrap("worker", runWorker(wctx, w)) }()
	go func() { defer close(ddone); errs <- wrap("dispatcher", d.Run(dctx)) }()
	go func() { defer close(gdone); errs <- wrap("gateway", g.Run(gctx)) }()

	// Until the worker is ready, a component that stops (the worker's id
	// claimed by another process, its runtime failing to start) or a store
	// failure ends the start: waiting on readiness alone, up sat for the
	// 5 minutes of WaitReady with the worker already gone and /readyz saying
	// ready on the dead process's last heartbeat (red team round 23).
	readyCtx, cancelReady := context.WithTimeout(ctx, 5*time.Minute)
	defer cancelReady()
	ready := make(chan error, 1)
	go func() { ready <- w.WaitReady(readyCtx) }()
	stopping, firstErr := awaitStart(ctx, ready, errs, srv.StoreFailed(), log)
	if !stopping && ctx.Err() == nil {
		fmt.Fprintf(stdout, `mlx-serving is up
  NATS       %s   (JetStream store: %s, sync_always=%v)
  gateway    http://%s/v1   (OpenAI-compatible; GET /v1/models, /healthz, /readyz, /metrics)
  worker     %s   model %q
Submit a job:
  go run ./cmd/mlx-serving submit --nats %s -m %s "Hello"
  curl -s http://%s/v1/chat/completions%s -d '{"model":"%s","messages":[{"role":"user","content":"Hello"}]}'
Ctrl-C drains and stops.
`, c.NATSURL, filepath.Join(c.DataDir, "jetstream"), c.SyncAlways, g.Addr(), w.ID(), modelID, c.NATSURL, modelID, g.Addr(), curlAuth(c), modelID)
		select {
		case <-ctx.Done():
		case firstErr = <-errs:
			log.Error().Err(firstErr).Msg("a component stopped; shutting down")
		case msg := <-srv.StoreFailed():
			firstErr = storeFailed(msg)
			log.Error().Err(firstErr).Msg("stopping for a restart")
		}
	}
	log.Info().Msg("stopping: gateway, then worker (drain), then dispatcher, then NATS")
	gcancel()
	<-gdone
	wcancel()
	<-wdone
	dcancel()
	<-ddone
	return firstErr
}

// awaitStart waits for the worker's readiness (ready), a component that
// stops (errs) or the store failing, whichever comes first, and says whether
// up must stop, with why. ctx ending (a signal) is not an error: readiness
// then ends with ctx's error and up stops in order.
func awaitStart(ctx context.Context, ready, errs <-chan error, failed <-chan string, log zerolog.Logger) (stop bool, why error) {
	select {
	case err := <-ready:
		if err != nil && ctx.Err() == nil {
			return true, fmt.Errorf("worker did not become ready: %w", err)
		}
		return ctx.Err() != nil, nil
	case err := <-errs:
		if err == nil {
			err = errors.New("a component stopped while starting")
		}
		log.Error().Err(err).Msg("a component stopped while starting; shutting down")
		return true, err
	case msg := <-failed:
		err := storeFailed(msg)
		log.Error().Err(err).Msg("stopping for a restart")
		return true, err
	}
}

// storeFailed is up's error for the embedded server's critical write error:
// it refuses writes to that stream until it restarts, so every submit (JOBS)
// or record (RESULTS) would fail while /readyz said ready. up stops, so the
// supervisor starts it again on the same store; what was accepted waits
// there (round 22, F1).
func storeFailed(msg string) error {
	return fmt.Errorf("the NATS store failed and refuses writes until the server restarts: %s", msg)
}

func wrap(what string, err error) error {
	if err == nil || errors.Is(err, context.Canceled) {
		return nil
	}
	return fmt.Errorf("%s: %w", what, err)
}

// services are the long-lived parts run on their own: what they do, and how.
var services = map[string]struct {
	short string
	run   func(ctx context.Context, c config.Config, nc *nats.Conn, log zerolog.Logger) error
}{
	"dispatcher": {"run a dispatcher: pull jobs, batch, route, retry, dead-letter", runDispatcher},
	"worker":     {"run a worker: supervise the MLX runtime and serve assignments", runWorkerService},
	"gateway":    {"run the OpenAI-compatible HTTP gateway", runGateway},
}

func (a *app) serviceCmd(name string) *cobra.Command {
	svc := services[name]
	cmd, s := serverCmd(name, svc.short)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		c, err := s.load()
		if err != nil {
			fmt.Fprintf(a.stderr, "mlx-serving %s: %v\n", name, err)
			return exitWith(exitUsage)
		}
		return exitWith(runService(cmd.Context(), name, c, a.stderr, svc.run))
	}
	return cmd
}

func runWorkerService(ctx context.Context, c config.Config, nc *nats.Conn, log zerolog.Logger) error {
	if tuneWorkerGC() {
		log.Debug().Int("gogc", workerGCPercent).Msg("worker GC target (GOGC or GOMEMLIMIT overrides)")
	}
	models, _, err := modelSpec(ctx, c, pythonPath(c), log)
	if err != nil {
		return err
	}
	w, err := newWorker(c, nc, models, log)
	if err != nil {
		return err
	}
	return runWorker(ctx, w)
}

func runDispatcher(ctx context.Context, c config.Config, nc *nats.Conn, log zerolog.Logger) error {
	d, err := newDispatcher(c, nc, log)
	if err != nil {
		return err
	}
	return d.Run(ctx)
}

func runGateway(ctx context.Context, c config.Config, nc *nats.Conn, log zerolog.Logger) error {
	g, err := newGateway(c, nc, "", log)
	if err != nil {
		return err
	}
	return g.Run(ctx)
}

// runWorker starts w and, when ctx ends, drains it: the heartbeat says draining,
// no new work is taken, running jobs finish (up to the drain timeout), the runtime
// shuts down. A second signal exits the process at once (signalContext).
func runWorker(ctx context.Context, w *worker.Agent) error {
	if err := w.Start(ctx); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
	case <-w.Stopped():
		return w.StopErr() // ErrWorkerIDInUse when a later process took the id over
	}
	return w.Drain(context.Background())
}

// startTracing installs the OTLP exporter when otlp_endpoint is set; the
// returned stop flushes what is pending, bounded so a dead collector cannot
// hold up the exit.
func startTracing(ctx context.Context, role string, c config.Config, log zerolog.Logger) (stop func(), err error) {
	shutdown, err := tracing.Setup(ctx, tracing.Options{Endpoint: c.OTLPEndpoint, ServiceName: "mlx-serving-" + role})
	if err != nil {
		return func() {}, err
	}
	if c.OTLPEndpoint != "" {
		log.Info().Str("endpoint", c.OTLPEndpoint).Msg("exporting traces over OTLP/HTTP")
	}
	return func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := shutdown(sctx); err != nil {
			log.Warn().Err(err).Msg("flushing traces")
		}
	}, nil
}

// curlAuth is the Authorization header the banner's curl line needs when the
// gateway requires a bearer token: one of the configured tokens, named only by
// a placeholder so the banner never prints a secret.
func curlAuth(c config.Config) string {
	if c.AuthTokens == "" {
		return ""
	}
	return ` -H "Authorization: Bearer $TOKEN"`
}
