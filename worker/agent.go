// Package worker is the agent on each Mac: it supervises the Python MLX runtime,
// announces itself in the worker registry, accepts batches from dispatchers,
// streams tokens to each job's reply subject, records terminal results, drains
// gracefully, and restarts a crashed runtime with backoff behind a circuit breaker.
package worker

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/breaker"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Config configures an Agent. Zero durations take the defaults in parentheses.
type Config struct {
	// WorkerID names the worker on the bus (subject token and registry key); required.
	WorkerID string
	// Conn is the bus connection to use; the agent does not close it. When nil the
	// agent connects with NATS (its Logger is replaced by the agent's) and drains
	// that connection when it stops.
	Conn *nats.Conn
	NATS bus.ConnectOptions

	// Python is the runtime's interpreter (DefaultPython()). RuntimeArgs are added
	// after `-m mlx_serving_runtime --max-batch N`; RuntimeEnv after the worker's
	// environment.
	Python      string
	RuntimeArgs []string
	RuntimeEnv  []string
	// Models are preloaded at every runtime start: "path" (id = base name) or
	// "id=path".
	Models []string
	// Slots is how many jobs run at once, and the runtime's --max-batch (8).
	Slots int

	HeartbeatInterval time.Duration // registry put period (1s)
	HealthInterval    time.Duration // runtime health check period (5s)
	HealthTimeout     time.Duration // one health check (5s)
	StartTimeout      time.Duration // runtime start until runtime.info answers (2m)
	LoadTimeout       time.Duration // one model.load (5m)
	StopTimeout       time.Duration // runtime shutdown until exit, then kill (30s)
	DrainTimeout      time.Duration // Drain's wait for running jobs (5m)
	ResultTimeout     time.Duration // retrying one RESULTS write (30s)
	AdoptPatience     time.Duration // offering a completed record nobody answers for (5m; adopt.go)

	RestartBackoffInitial time.Duration // first restart delay (500ms)
	RestartBackoffMax     time.Duration // longest restart delay (30s)
	BreakerThreshold      int           // crashes within BreakerWindow that open the breaker (5)
	BreakerWindow         time.Duration // (2m)
	BreakerCooldown       time.Duration // open period before the half-open probe (30s)

	// Coalesce batches token events (DefaultCoalesce when zero; a negative
	// Interval turns it off).
	Coalesce Coalesce
	// Version is announced in the heartbeat.
	Version string
	Logger  zerolog.Logger
	// Observer is told what the agent does (metrics); nil: nobody.
	Observer Observer
}

func (c *Config) defaults() error {
	if c.WorkerID == "" {
		return errors.New("worker: Config.WorkerID is required")
	}
	if c.Python == "" {
		c.Python = DefaultPython()
	}
	if c.Observer == nil {
		c.Observer = nopObserver{}
	}
	if c.Slots <= 0 {
		c.Slots = 8
	}
	if c.Coalesce == (Coalesce{}) {
		c.Coalesce = DefaultCoalesce
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.HeartbeatInterval, time.Second)
	def(&c.HealthInterval, 5*time.Second)
	def(&c.HealthTimeout, 5*time.Second)
	def(&c.StartTimeout, 2*time.Minute)
	def(&c.LoadTimeout, 5*time.Minute)
	def(&c.StopTimeout, 30*time.Second)
	def(&c.DrainTimeout, 5*time.Minute)
	def(&c.ResultTimeout, 30*time.Second)
	def(&c.AdoptPatience, 5*time.Minute)
	def(&c.RestartBackoffInitial, 500*time.Millisecond)
	def(&c.RestartBackoffMax, 30*time.Second)
	def(&c.BreakerWindow, 2*time.Minute)
	def(&c.BreakerCooldown, 30*time.Second)
	if c.BreakerThreshold <= 0 {
		c.BreakerThreshold = 5
	}
	return nil
}

// ErrNotStarted is returned by Drain and Shutdown before Start.
var ErrNotStarted = errors.New("worker: agent not started")

// Agent is one worker. Start it, then stop it with Drain (finish running work) or
// Shutdown (stop now); or use Run.
type Agent struct {
	cfg  Config
	log  zerolog.Logger
	host hostFacts
	// beforeClaim, if set, runs between the id check and the claim
	// (idclaim.go; tests: line two starts up).
	beforeClaim func()
	// beforeRewrite, if set, runs between putHeartbeat's read of an entry
	// that changed and its write over it (tests: a later process claims).
	beforeRewrite func()
	// models announces the served models to subjects.BucketModels (heartbeat loop only).
	announcer modelAnnouncer

	nc     *nats.Conn
	ownNC  bool
	mark   string // reply subject of its attempt reports and progress events (subjects.Sent)
	js     jetstream.JetStream
	subs   []*nats.Subscription
	sup    *supervisor
	life   *lifecycle
	jobs   *jobTable
	models []ModelSpec

	// handOver sends a terminal record to its dispatcher and returns the answer
	// (a request on the bus; tests replace it).
	handOver func(ctx context.Context, subject string, data []byte) ([]byte, error)

	startedAt time.Time    // once per process: dispatchers tell a restart by it
	notForMe  atomic.Int64 // assignments for another process of this worker id, not answered (assign.go)
	// hbRev: the revision of this process's last registry write (0: none yet,
	// or unknown); superseded: a later process of this id took it over, and
	// this one stopped (heartbeat.go).
	hbRev      uint64
	superseded atomic.Bool
	room       chan struct{} // a full worker freed a slot: heartbeat soon
	prefixes   prefixLog     // prompt prefixes the runtime ran: the heartbeat's routing hints (prefixes.go)
	assignMu   sync.Mutex    // orders assignment admission against Drain

	jobCtx    context.Context // running jobs; cancelled only as the last resort of a stop
	jobCancel context.CancelFunc
	hbCancel  context.CancelFunc
	hbDone    chan struct{}

	startOnce sync.Once
	started   bool
	stopOnce  sync.Once
	stopped   chan struct{}
	hurry     chan struct{}
	hurryOnce sync.Once
}

// New checks cfg and returns an agent; nothing runs until Start.
func New(cfg Config) (*Agent, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	a := &Agent{
		cfg:     cfg,
		log:     cfg.Logger.With().Str("worker_id", cfg.WorkerID).Logger(),
		life:    newLifecycle(),
		stopped: make(chan struct{}),
		hurry:   make(chan struct{}),
		room:    make(chan struct{}, 1),
	}
	a.handOver = a.handOverRequest
	for _, m := range cfg.Models {
		a.models = append(a.models, ParseModelSpec(m))
	}
	obs := cfg.Observer
	obs.Slots(cfg.Slots)
	obs.State(string(a.life.get()))
	a.life.onChange = func(s State) { obs.State(string(s)) }
	a.jobs = newJobTable(cfg.Slots,
		func() { _, _ = a.life.fire(EventJobsStarted) },
		func() { _, _ = a.life.fire(EventJobsIdle) })
	a.jobs.onCount = obs.InFlight
	a.jobs.onRoom = func() {
		select {
		case a.room <- struct{}{}:
		default:
		}
	}
	obs.InFlight(0)
	a.sup = newSupervisor(supervisorOptions{
		Python: cfg.Python, ExtraArgs: cfg.RuntimeArgs, Env: cfg.RuntimeEnv,
		MaxBatch: cfg.Slots, Models: a.models,
		StartTimeout: cfg.StartTimeout, LoadTimeout: cfg.LoadTimeout,
		HealthInterval: cfg.HealthInterval, HealthTimeout: cfg.HealthTimeout, StopTimeout: cfg.StopTimeout,
		BackoffInitial: cfg.RestartBackoffInitial, BackoffMax: cfg.RestartBackoffMax,
		Breaker: breaker.Options{Threshold: cfg.BreakerThreshold, Window: cfg.BreakerWindow,
			OnChange: func(st breaker.State) { obs.Breaker(st.String()) }},
		Observer: obs,
		Cooldown: cfg.BreakerCooldown,
		Logger:   cfg.Logger.With().Str("worker_id", cfg.WorkerID).Str("component", "runtime").Logger(),
		OnUp:     func() { _, _ = a.life.fire(EventRuntimeUp) },
		OnDown:   func() { _, _ = a.life.fire(EventRuntimeDown) },
	})
	obs.Breaker(a.sup.breaker.State().String())
	return a, nil
}

// ID is the worker id.
func (a *Agent) ID() string { return a.cfg.WorkerID }

// State is the lifecycle state.
func (a *Agent) State() State { return a.life.get() }

// BreakerState is the runtime circuit breaker's state.
func (a *Agent) BreakerState() breaker.State { return a.sup.breaker.State() }

// InFlight is the number of jobs running.
func (a *Agent) InFlight() int { return a.jobs.inFlight() }

// RuntimePID is the running runtime's process id, 0 when it is not up.
func (a *Agent) RuntimePID() int { return a.sup.pid() }

// Heartbeat is the registry entry the agent would put now.
func (a *Agent) Heartbeat() schemas.HeartbeatMsg { return a.heartbeat() }

// Start connects (unless Config.Conn is set), subscribes to assignments and
// cancels, starts the runtime supervisor and the heartbeat, and returns. The worker
// announces itself unavailable until the runtime is up; WaitReady waits for that.
// ctx bounds only the start itself.
func (a *Agent) Start(ctx context.Context) error {
	err := ErrNotStarted
	a.startOnce.Do(func() { err = a.start(ctx) })
	return err
}

func (a *Agent) start(ctx context.Context) error {
	a.startedAt = time.Now().UTC()
	a.host = readHostFacts()
	a.nc = a.cfg.Conn
	if a.nc == nil {
		opts := a.cfg.NATS
		if opts.Name == "" {
			opts.Name = "worker-" + a.cfg.WorkerID
		}
		opts.Logger = a.log
		nc, err := bus.Connect(ctx, opts)
		if err != nil {
			return fmt.Errorf("worker: connect: %w", err)
		}
		a.nc, a.ownNC = nc, true
	}
	js, err := bus.NewJetStream(a.nc)
	if err != nil {
		return fmt.Errorf("worker: jetstream: %w", err)
	}
	a.mark = a.nc.NewInbox()
	a.js = js
	a.jobCtx, a.jobCancel = context.WithCancel(context.Background())
	// Before the assign subscription: a second process under this id must not
	// take a single assignment (idclaim.go).
	if err := a.claimID(ctx); err != nil {
		if a.ownNC {
			a.nc.Close()
		}
		return err
	}

	for subj, h := range map[string]nats.MsgHandler{
		subjects.Assign(a.cfg.WorkerID):       a.handleAssign,
		subjects.WorkerCancel(a.cfg.WorkerID): a.handleCancel,
	} {
		sub, err := a.nc.Subscribe(subj, onlyOn(subj, h, a.log))
		if err != nil {
			a.unsubscribe()
			return fmt.Errorf("worker: subscribe %s: %w", subj, err)
		}
		// Cancels and assignments must never be dropped as a slow consumer.
		_ = sub.SetPendingLimits(-1, -1)
		a.subs = append(a.subs, sub)
	}
	fctx, fcancel := context.WithTimeout(ctx, 10*time.Second)
	err = a.nc.FlushWithContext(fctx)
	fcancel()
	if err != nil {
		a.unsubscribe()
		return fmt.Errorf("worker: flush subscriptions: %w", err)
	}

	a.sup.start(context.Background())
	hbCtx, cancel := context.WithCancel(context.Background())
	a.hbCancel, a.hbDone = cancel, make(chan struct{})
	go func() {
		defer close(a.hbDone)
		a.heartbeatLoop(hbCtx)
	}()
	a.started = true
	a.log.Info().Int("slots", a.cfg.Slots).Str("python", a.cfg.Python).Msg("worker started")
	return nil
}

func (a *Agent) unsubscribe() {
	for _, s := range a.subs {
		_ = s.Unsubscribe()
	}
	a.subs = nil
}

// WaitReady returns once the runtime is up and the worker takes assignments, or
// with ctx's error, or with ErrNotStarted-wrapped state when it is stopping.
func (a *Agent) WaitReady(ctx context.Context) error {
	for {
		st, ch := a.life.watch()
		switch st {
		case StateReady, StateBusy:
			return nil
		case StateDraining, StateStopped:
			return fmt.Errorf("worker: %s", st)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ch:
		}
	}
}

// Run starts the agent and runs until ctx is done, then stops now (Shutdown)
// within StopTimeout. For a graceful stop call Drain instead of cancelling ctx.
func (a *Agent) Run(ctx context.Context) error {
	if err := a.Start(ctx); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
	case <-a.stopped:
		return a.StopErr()
	}
	sctx, cancel := context.WithTimeout(context.Background(), a.cfg.StopTimeout+5*time.Second)
	defer cancel()
	return a.Shutdown(sctx)
}

// Drain stops the worker gracefully: the heartbeat says draining, new assignments
// are rejected, running jobs may finish for up to DrainTimeout (or until ctx ends,
// or Shutdown is called); jobs still running then are stopped and reported as
// retryable attempts (code worker_shutdown) so a dispatcher resumes them elsewhere.
// Then the runtime is shut down, the registry entry removed, and Drain returns nil.
func (a *Agent) Drain(ctx context.Context) error { return a.stop(ctx, a.cfg.DrainTimeout) }

// Shutdown stops the worker now: like Drain without waiting for running jobs. It
// also cuts short a Drain in progress (the CLI's second signal).
func (a *Agent) Shutdown(ctx context.Context) error {
	a.hurryOnce.Do(func() { close(a.hurry) })
	return a.stop(ctx, 0)
}

// Stopped is closed once the agent has stopped.
func (a *Agent) Stopped() <-chan struct{} { return a.stopped }

// StopErr is why the agent stopped on its own: an error wrapping
// ErrWorkerIDInUse when a later process of its worker id took the id over
// (heartbeat.go), else nil.
func (a *Agent) StopErr() error {
	if a.superseded.Load() {
		return errSuperseded
	}
	return nil
}

func (a *Agent) stop(ctx context.Context, wait time.Duration) error {
	if !a.started {
		return ErrNotStarted
	}
	a.stopOnce.Do(func() {
		go func() {
			defer close(a.stopped)
			a.doStop(wait)
		}()
	})
	select {
	case <-a.stopped:
		return nil
	case <-ctx.Done():
		// Whatever ctx said, the stop goes on in the background, now hurried.
		a.hurryOnce.Do(func() { close(a.hurry) })
		return ctx.Err()
	}
}

func (a *Agent) doStop(wait time.Duration) {
	a.assignMu.Lock()
	_, _ = a.life.fire(EventDrain)
	a.assignMu.Unlock()
	a.log.Info().Int("in_flight", a.jobs.inFlight()).Dur("wait", wait).Msg("worker draining")

	if wait > 0 {
		wctx, cancel := context.WithTimeout(context.Background(), wait)
		go func() {
			select {
			case <-a.hurry:
				cancel()
			case <-wctx.Done():
			}
		}()
		if err := a.jobs.waitIdle(wctx); err != nil {
			a.log.Warn().Int("in_flight", a.jobs.inFlight()).Msg("drain time is up; stopping the jobs still running")
		}
		cancel()
	}
	left := a.jobs.all()
	for _, r := range left {
		r.requestStop(stopShutdown)
	}
	if len(left) > 0 {
		// Cancelled jobs end promptly; a runtime that does not answer is cut off.
		wctx, cancel := context.WithTimeout(context.Background(), a.cfg.StopTimeout)
		if err := a.jobs.waitIdle(wctx); err != nil {
			a.jobCancel()
			_ = a.jobs.waitIdle(context.Background())
		}
		cancel()
	}
	sctx, cancel := context.WithTimeout(context.Background(), a.cfg.StopTimeout+5*time.Second)
	defer cancel()
	a.sup.stop(sctx, schemas.ShutdownDrain)
	a.jobCancel()

	a.hbCancel()
	<-a.hbDone
	a.unsubscribe()
	_, _ = a.life.fire(EventStop)
	dctx, dcancel := context.WithTimeout(context.Background(), 2*time.Second)
	a.deleteHeartbeat(dctx)
	dcancel()
	if a.ownNC {
		_ = a.nc.Drain()
	}
	a.log.Info().Msg("worker stopped")
}
