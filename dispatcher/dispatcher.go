package dispatcher

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/mlx-serving/mlx-serving/internal/prefix"
	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"go.opentelemetry.io/otel/trace"
)

// ErrRunning is returned by Run when the Dispatcher already runs or ran.
var ErrRunning = errors.New("dispatcher: Run called twice")

// Dispatcher owns jobs from delivery to terminal state. Create it with New, run
// it with Run; any number of dispatchers may run against one JetStream.
type Dispatcher struct {
	cfg     Config
	nc      *nats.Conn
	mark    string // reply subject of its forwarded cancels (subjects.Sent)
	js      jetstream.JetStream
	log     zerolog.Logger
	rare    zerolog.Logger // for what a client can cause at any rate: sampled
	metrics Metrics

	jobsStream    jetstream.Stream
	cancelsStream jetstream.Stream
	ledgerStream  jetstream.Stream
	consumers     [schemas.NumPriorities]jetstream.Consumer
	pullWRR       wrr // pull goroutine only
	// behind is, per priority, how many jobs the consumer held after the last
	// fetch (its NumPending; 0 when the fetch came back short): jobs on their
	// way, worth waiting MaxWait for to fill a batch. None behind, a batch
	// leaves at once.
	behind [schemas.NumPriorities]atomic.Uint64
	// storedSeq and pulledSeq are, per priority, the highest stream sequence
	// a wake-up announced and the highest pulled (awaitStored).
	storedSeq, pulledSeq [schemas.NumPriorities]atomic.Uint64
	pollEvery            time.Duration // how often the puller looks without a wake-up (pollEvery; tests lengthen it)
	storedGrace          time.Duration // storedGrace; tests lengthen it

	// dones and adoptions take the workers' hand-overs (onDone) and
	// adoption offers (onAdopt) a few at once, off the subscription, each
	// worker in turn (takequeue.go): each is a schema validation, too slow
	// for one subscription goroutine at thousands of jobs a second, and one
	// worker's flood must not hold the others' records.
	dones, adoptions *takeQueue
	warm             *warmPool // goroutines for checks, hand-overs and assignments
	wakePull         chan struct{}
	wakeSched        chan struct{}
	// refusingWrites counts terminal writes waiting to be tried again
	// (writeretry.go): while any does, schedule places no job.
	refusingWrites atomic.Int64
	changed        chan struct{} // pinged when a job is forgotten (drain waits on it)

	wctx    context.Context // lives until Run stops: I/O of held jobs
	wcancel context.CancelFunc
	// tctx outlives wctx by up to WriteGrace: terminal writes (records,
	// dead letters, acks) run under it, so that a shutdown does not cut a
	// write that is under way and leave its job to run again.
	tctx    context.Context
	tcancel context.CancelFunc
	// writes counts terminal writes and received hand-overs not yet done
	// (goWrite, onDoneConcurrently); shutdown waits for it to reach zero.
	writes atomic.Int64
	// awaiting is closed when a stop starts waiting for writes (tests hold
	// a write until then).
	awaiting chan struct{}
	io       sync.WaitGroup

	mu       sync.Mutex
	started  bool
	draining bool
	jobs     map[string]*job
	queues   [schemas.NumPriorities][]*job // queued jobs by priority, sorted by stream sequence
	retrying map[string]*job
	// cancelled holds every stored cancel (job key → when seen), from CANCELS.
	cancelled     map[string]time.Time
	unrun         unrunNotes    // unrun.go
	cancelsMaxAge time.Duration // CANCELS' max age: how long a cancel is remembered
	prunedAt      time.Time
	onWorker      int // jobs dispatched or running
	workers       map[string]*workerView
	hearing       hearing // tick.go, hearing.go
	pickWRR       wrr
	router        Router
	batchSeq      uint64
	// unsettled: jobs settling (settle.go) that wait for the next barrier;
	// barrierOut: a barrier is set and has not run yet.
	unsettled  []*job
	barrierOut bool
	// announced caches the models bucket's answers per model (availability.go).
	announced *announcements
	// resumeCapBytes is resumeCap (progress.go).
	resumeCapBytes int
	// assignBudget is what the jobs of one assignment may take, in bytes
	// (assignsize.go), from the max payload the server announced.
	assignBudget int

	// progressHook, if set, runs before each progress event is handled
	// (tests: hold token events back to force an interleaving).
	progressHook func()
	// writeHook, if set, runs before each terminal write (tests: hold a write
	// until shutdown).
	writeHook func()
	// letterPatience: how long a failing dead letter is tried (deadletter.go).
	letterPatience time.Duration
	exhaustGrace   time.Duration // exhaust.go
	// handOverHook, if set, runs before each received hand-over is decoded
	// (tests: hold one until shutdown).
	handOverHook func()
	// queuedHook, if set, is told of each job put in its queue at intake:
	// when JOBS stored it, when its check started and now (benchmarks: where
	// a job waits). Called under d.mu.
	queuedHook func(stored, checked, queued time.Time)
	// fetchedHook, if set, runs after each fetch that got jobs, before their
	// intake (tests: run the scheduler in that window).
	fetchedHook func()
	// intakenHook, if set, runs after each such fetch's intake (tests: run
	// the scheduler there).
	intakenHook func()
}

// job is one held JOBS message. Guarded by Dispatcher.mu.
type job struct {
	id        string
	tenant    string // from the subject: the tenant the server let publish it
	key       string // subjects.JobRef{tenant, id}.Key(): d.jobs' key
	pri       int
	msg       jetstream.Msg
	seq       uint64 // stream sequence: FIFO order within a priority
	req       schemas.JobRequest
	state     State
	attempt   int
	base      int  // attempts used before a replay (job metadata mlx_attempt_base)
	spared    int  // attempts lost to this dispatcher's own outage, not counted (batcher.go: assign)
	intaking  bool // registered but not yet checked against RESULTS/CANCELS
	inQueue   bool
	gone      bool // forgotten: terminal or handed back
	enqueued  time.Time
	offered   time.Time // when the current attempt was offered to a worker (AttemptTimeout)
	givenUp   time.Time // when the current attempt timed out and its worker was told to stop it (zero: not yet)
	progress  time.Time // last in-progress ack
	retryAt   time.Time
	bo        backoff.BackOff
	cancelReq bool
	ran       bool // offered to a worker at least once by this dispatcher
	// deliv is the delivery count of msg; high the highest attempt offered
	// in earlier deliveries, from the ledger; ledgered: LEDGER holds an
	// entry of this message, dropped once its record is stored; noting: the
	// entry of the next attempt is being written, which must land before the
	// attempt starts (ledger.go).
	deliv    int
	high     int
	ledgered bool
	noting   bool

	workerID string
	batchID  string
	endedAt  time.Time      // when the worker ended the attempt (its clock), from the result or report
	resume   schemas.Resume // what the caller received before the current attempt
	// size: req's encoded length in an assignment, counted once at intake
	// (assignsize.go). alone: an assignment holding the job was over the
	// max payload after all; it goes alone and without its resume.
	size  int
	alone bool
	// resumeSize: resume.Text's JSON-encoded length; curSize: cur's. Their
	// sum stays within resumeCap (progress.go).
	resumeSize int
	cur        strings.Builder // the current attempt's text, from its worker's progress events
	curSize    int
	curToks    int // cumulative completion tokens from the current attempt's events
	// untracked: the current attempt's events are no longer tracked (a gap,
	// or past resumeCap); its retry starts over.
	untracked bool
	// settling: the attempt failed silently (no report carries its text) and
	// token events it published may still wait in the progress subscription's
	// queue; cur keeps growing until a barrier behind them has passed
	// (settleReplies), and only then is it folded into resume and the job
	// requeued. settleBy bounds the wait.
	settling bool
	settleBy time.Time
	nextSeq  int
	lastErr  schemas.ErrorInfo
	chain    []prefix.Hash   // the prompt's prefix chain, hashed once at intake (router.go)
	tctx     context.Context // the submitter's trace context, from the JOBS headers
	span     trace.Span      // the current attempt's mlx.dispatch span, until accepted
}

// New checks cfg and returns a Dispatcher; nothing touches NATS until Run.
func New(cfg Config) (*Dispatcher, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	js, err := jetstream.New(cfg.Conn)
	if err != nil {
		return nil, fmt.Errorf("dispatcher: jetstream: %w", err)
	}
	d := &Dispatcher{
		cfg:            cfg,
		nc:             cfg.Conn,
		mark:           cfg.Conn.NewInbox(),
		js:             js,
		announced:      newAnnouncements(),
		resumeCapBytes: resumeCapFor(cfg.Conn.MaxPayload()),
		assignBudget:   assignBudgetFor(cfg.Conn.MaxPayload(), cfg.DispatcherID),
		log:            cfg.Logger.With().Str("dispatcher_id", cfg.DispatcherID).Logger(),
		rare:           cfg.Logger.With().Str("dispatcher_id", cfg.DispatcherID).Logger().Sample(&zerolog.BurstSampler{Burst: 5, Period: 10 * time.Second}),
		warm:           newWarmPool(),
		pollEvery:      pollEvery,
		storedGrace:    storedGrace,
		letterPatience: letterPatience,
		exhaustGrace:   exhaustGrace,
		wakePull:       make(chan struct{}, 1),
		wakeSched:      make(chan struct{}, 1),
		changed:        make(chan struct{}, 1),
		awaiting:       make(chan struct{}),
		jobs:           map[string]*job{},
		retrying:       map[string]*job{},
		cancelled:      map[string]time.Time{},
		workers:        map[string]*workerView{},
	}
	d.pullWRR.w = cfg.Weights
	d.pickWRR.w = cfg.Weights
	d.router = newRouter(cfg)
	d.dones = newTakeQueue(d, "terminal hand-over", maxHandOvers, d.onDone, d.doneLimit)
	d.adoptions = newTakeQueue(d, "adoption", maxAdoptions, d.onAdopt, func(string) int { return adoptQueueLimit })
	d.count().series()
	return d, nil
}

// Metrics returns the live counters (the same events the Observer is told).
func (d *Dispatcher) Metrics() *Metrics { return &d.metrics }

// ID returns the configured DispatcherID.
func (d *Dispatcher) ID() string { return d.cfg.DispatcherID }

// ConsumerName is the durable consumer of one priority; every dispatcher with the
// same prefix shares it.
func ConsumerName(prefix, priority string) string { return prefix + "-" + priority }

func poke(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// attach looks up the streams and the worker bucket and creates or updates the
// durable consumers, one per priority.
func (d *Dispatcher) attach(ctx context.Context) error {
	var err error
	if d.jobsStream, err = d.js.Stream(ctx, subjects.StreamJobs); err != nil {
		return fmt.Errorf("dispatcher: stream %s: %w", subjects.StreamJobs, err)
	}
	if d.cancelsStream, err = d.js.Stream(ctx, subjects.StreamCancels); err != nil {
		return fmt.Errorf("dispatcher: stream %s: %w", subjects.StreamCancels, err)
	}
	if d.ledgerStream, err = d.js.Stream(ctx, subjects.StreamLedger); err != nil {
		return fmt.Errorf("dispatcher: stream %s: %w", subjects.StreamLedger, err)
	}
	if _, err = d.js.Stream(ctx, subjects.StreamResults); err != nil { // read by results.Stored
		return fmt.Errorf("dispatcher: stream %s: %w", subjects.StreamResults, err)
	}
	for i := range schemas.Priorities {
		if d.consumers[i], err = d.makeJobsConsumer(ctx, i); err != nil {
			return err
		}
	}
	if _, err := d.js.KeyValue(ctx, subjects.BucketWorkers); err != nil {
		return fmt.Errorf("dispatcher: bucket %s: %w", subjects.BucketWorkers, err)
	}
	return nil
}

// Run consumes jobs until ctx is cancelled, then stops pulling, hands back the
// jobs not yet on a worker (nak, so another dispatcher takes them at once),
// waits up to DrainTimeout for the running ones to finish (unless NoDrain),
// then up to WriteGrace for the terminal records being written (nak for those
// that were not stored), and returns. The streams, the consumers' stream and
// the KV bucket must exist (jsprov.Provision); the consumers are created or
// updated here.
func (d *Dispatcher) Run(ctx context.Context) error {
	d.mu.Lock()
	if d.started {
		d.mu.Unlock()
		return ErrRunning
	}
	d.started = true
	d.mu.Unlock()

	// A cluster electing a leader answers with timeouts for a while; a
	// dispatcher waits it out instead of exiting (and being restarted in a loop).
	err := backoff.RetryNotify(func() (err error) {
		err = d.attach(ctx)
		if errors.Is(err, jetstream.ErrStreamNotFound) || errors.Is(err, jetstream.ErrBucketNotFound) {
			return backoff.Permanent(err) // not provisioned: waiting will not help
		}
		return err
	}, backoff.WithContext(backoff.NewExponentialBackOff(backoff.WithMaxElapsedTime(d.cfg.AttachTimeout)), ctx),
		func(err error, wait time.Duration) {
			d.log.Warn().Err(err).Dur("retry_in", wait).Msg("attaching to JetStream failed; retrying")
		})
	if err != nil {
		return err
	}

	d.wctx, d.wcancel = context.WithCancel(context.WithoutCancel(ctx))
	defer d.wcancel()
	d.tctx, d.tcancel = context.WithCancel(context.WithoutCancel(ctx))
	defer d.tcancel()
	watcher, err := registry.Watch(d.wctx, d.js, registry.WatchOptions{
		OnBadEntry: func(id string, err error) {
			d.log.Warn().Err(err).Str("worker_id", id).Msg("bad heartbeat")
		},
		OnRestart: func(err error) {
			d.log.Warn().AnErr("last_error", err).Msg("worker registry watch ended; reopening it")
		},
	})
	if err != nil {
		return fmt.Errorf("dispatcher: watch %s: %w", subjects.BucketWorkers, err)
	}
	defer watcher.Stop()

	var subs []*nats.Subscription
	defer func() {
		for _, s := range subs {
			_ = s.Unsubscribe()
		}
	}()
	// Terminal records are learnt from RESULTS itself (an ordered consumer
	// delivers only what JetStream stored), never from a core subscription on
	// the subject: a message seen there may never be stored, and acking a job
	// on it could lose the job in a crash.
	stopResults, err := d.watchResults(d.wctx)
	if err != nil {
		return err
	}
	defer stopResults()
	// Cancels too come from their stream, the stored ones first (no job is
	// pulled before they are known), and only from there: a cancel the stream
	// refused (full, too large) must not stop a job while its caller is told
	// it failed, and a core subscription on the cancel subjects would hand
	// every dispatcher every published cancel, refused or not. A running job's
	// cancel waits for the store and the consumer's push (a few ms).
	stopCancels, err := d.watchCancels(ctx)
	if err != nil {
		return err
	}
	defer stopCancels()
	for subj, h := range map[string]nats.MsgHandler{
		subjects.DoneForDispatcher(d.cfg.DispatcherID): d.onDoneConcurrently,
		subjects.AttemptAll:                            d.onAttemptReport,
	} {
		s, err := d.nc.Subscribe(subj, h)
		if err != nil {
			return fmt.Errorf("dispatcher: subscribe %s: %w", subj, err)
		}
		subs = append(subs, s)
	}
	as, err := d.subscribeAdopt()
	if err != nil {
		return err
	}
	subs = append(subs, as)
	// On d.nc, like every subscription here: settle.go's barrier must run
	// behind its queue too. Bounded: every worker feeds it (progress.go).
	progress := subjects.ProgressForDispatcher(d.cfg.DispatcherID)
	ps, err := d.nc.Subscribe(progress, d.onProgress)
	if err != nil {
		return fmt.Errorf("dispatcher: subscribe %s: %w", progress, err)
	}
	subs = append(subs, ps)
	if err := ps.SetPendingLimits(progressPendingMsgs, progressPendingBytes); err != nil {
		return fmt.Errorf("dispatcher: subscribe %s: %w", progress, err)
	}
	// New jobs wake the puller: JOBS re-publishes the headers of each job it
	// stored (jsprov), so the wake-up comes after the store (the pull it
	// triggers finds the job; a core subscription on the job subjects raced the
	// store and left a lone job to the next poll) and carries no job body.
	s, err := d.nc.Subscribe(subjects.JobsStored, d.onStored)
	if err != nil {
		return fmt.Errorf("dispatcher: subscribe %s: %w", subjects.JobsStored, err)
	}
	subs = append(subs, s)
	// The subscriptions must be live on the server before the first pull, or a
	// cancel published in between would go unseen.
	if err := d.nc.FlushTimeout(10 * time.Second); err != nil {
		return fmt.Errorf("dispatcher: flush: %w", err)
	}

	var loops sync.WaitGroup
	pullCtx, stopPull := context.WithCancel(ctx)
	defer stopPull()
	loops.Add(5)
	go func() { defer loops.Done(); d.strandLoop(d.wctx) }()
	go func() { defer loops.Done(); d.watchLoop(watcher) }()
	go func() { defer loops.Done(); d.pullLoop(pullCtx) }()
	go func() { defer loops.Done(); d.schedLoop(d.wctx) }()
	go func() { defer loops.Done(); d.tickLoop(d.wctx) }()
	d.log.Info().Msg("dispatcher running")

	<-ctx.Done()
	stopPull()
	d.shutdown()
	d.wcancel()
	loops.Wait()
	// Hand-overs keep being taken until Run returns: a running job that
	// finishes now is still stored and acked here.
	d.awaitWrites()
	d.tcancel()
	d.io.Wait()
	d.log.Info().Msg("dispatcher stopped")
	return nil
}

// shutdown hands back what is not on a worker and waits for the rest.
func (d *Dispatcher) shutdown() {
	d.mu.Lock()
	d.draining = true
	for _, j := range d.jobs {
		if j.state == StateQueued || j.state == StateRetrying {
			d.handBackLocked(j)
		}
	}
	d.mu.Unlock()
	if d.cfg.NoDrain {
		return
	}
	deadline := time.NewTimer(d.cfg.DrainTimeout)
	defer deadline.Stop()
	for {
		d.mu.Lock()
		n := len(d.jobs)
		d.mu.Unlock()
		if n == 0 {
			return
		}
		select {
		case <-d.changed:
		case <-deadline.C:
			d.log.Warn().Int("jobs", n).Msg("drain timeout: leaving running jobs to redelivery")
			return
		}
	}
}

// awaitWrites waits up to WriteGrace for the terminal writes and hand-overs
// in flight.
func (d *Dispatcher) awaitWrites() {
	if d.writes.Load() == 0 {
		return
	}
	close(d.awaiting)
	deadline := time.NewTimer(d.cfg.WriteGrace)
	defer deadline.Stop()
	for d.writes.Load() > 0 {
		select {
		case <-d.changed:
		case <-deadline.C:
			d.log.Warn().Int64("writes", d.writes.Load()).Msg("write grace over: cancelling terminal writes in flight; their jobs are naked")
			return
		}
	}
}
