// Package fakeworker is the one fake worker: it serves mlx.worker.<id>.assign
// over real NATS like the worker does (answers accepted or full, streams token
// events to the job's reply subject, hands each terminal record to the
// dispatcher that placed the job, reports retryable failures), heart-beats
// into the registry, and takes the runtime out. Dispatcher tests script it per
// attempt (Plan); the bench runs the dispatcher's ceiling against it. In
// Direct mode it takes jobs straight off JOBS and plays the dispatcher's part
// in small (retries, RESULTS), so the gateway's tests script what reaches a
// reply subject — lost events, missing terminals, attempts that start over —
// with the same Plan.
package fakeworker

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Options configure a fake worker.
type Options struct {
	ID     string
	Slots  int
	Models []string
	// Plan picks each attempt's Plan; nil: the zero Plan.
	Plan func(schemas.AssignedJob) Plan
	// HeartbeatEvery is the period of the registry put (100ms).
	HeartbeatEvery time.Duration
	// Quiet: no extra put on every accept and finish, only the period and
	// full → free (rate-limited like the real worker).
	Quiet bool
	// Silent: not even the full → free put: one heartbeat at start, then one
	// per HeartbeatEvery.
	Silent bool
	// Hostname in the heartbeat ("test").
	Hostname string
	// HandOverTimeout bounds the hand-over of a terminal record (10s).
	HandOverTimeout time.Duration
	// NoAdopt: a record whose dispatcher is gone is not offered for adoption
	// (a worker from before adoption).
	NoAdopt bool
	// Full, if set, is asked about every assignment first: full answers it
	// full with free free slots, taking nothing, whatever its slots hold. A
	// worker whose slots filled since the dispatcher counted them (free below
	// the batch), or a credential that lies (free at or above it: red team
	// round 11, F1). Runs on the worker's goroutine.
	Full func(a schemas.AssignmentMsg) (full bool, free int)
	// Direct: serve jobs straight off the job subjects, with no dispatcher (see
	// serveDirect): what a gateway's tests need to script exactly what reaches a
	// reply subject.
	Direct bool
	// Errorf is told what a test should fail on (an assignment that is no
	// AssignmentMsg); Logf what it may want to see (a hand-over that failed).
	// Both may be nil; Errors counts them either way.
	Errorf, Logf func(format string, args ...any)
}

// Stats are what the worker saw.
type Stats struct {
	MaxBatch  int             // the largest batch accepted
	Fulls     int             // assignments answered full
	Latencies []time.Duration // job created_at → assignment taken, for jobs that carry created_at
	Refused   []string        // "<job-id>:<answer>" of hand-overs not answered stored
}

// Worker is a running fake worker.
type Worker struct {
	opts Options
	nc   *nats.Conn
	mark string // reply subject of its attempt reports and progress events (subjects.Sent)
	js   jetstream.JetStream
	reg  registry.Bucket
	errs atomic.Int64

	hbMu      sync.Mutex // one put at a time, so entries reach the bucket in the order they were built
	mu        sync.Mutex
	startedAt time.Time // of the current incarnation (process)
	inc       int       // incarnation: bumped by RestartNow
	inflight  int
	stats     Stats
	assigned  map[string]int // job id -> attempts started here
	order     []string       // job ids in assignment order
	batches   []schemas.AssignmentMsg
	dead      bool
	release   chan struct{}
	onAssign  chan schemas.AssignmentMsg
	sub       *nats.Subscription
	stopHB    chan struct{}
	hbDone    chan struct{}
	hbNudge   chan struct{} // quiet mode: the worker went from full to a free slot
	// beforeReply, if set, runs after a batch is taken and before the answer
	// leaves (read under mu).
	beforeReply func(a schemas.AssignmentMsg)
	// advertised: the heartbeat's prefixes (routing hints).
	advertised []schemas.ModelPrefixes
}

// Start subscribes to the worker's assignments on nc, puts a first heartbeat
// and heart-beats until Stop.
func Start(ctx context.Context, nc *nats.Conn, opts Options) (*Worker, error) {
	if opts.HeartbeatEvery <= 0 {
		opts.HeartbeatEvery = 100 * time.Millisecond
	}
	if opts.HandOverTimeout <= 0 {
		opts.HandOverTimeout = 10 * time.Second
	}
	if opts.Hostname == "" {
		opts.Hostname = "test"
	}
	if opts.Plan == nil {
		opts.Plan = func(schemas.AssignedJob) Plan { return Plan{} }
	}
	js, err := bus.NewJetStream(nc)
	if err != nil {
		return nil, err
	}
	w := &Worker{opts: opts, nc: nc, mark: nc.NewInbox(), js: js, startedAt: time.Now().UTC(), hbNudge: make(chan struct{}, 1),
		assigned: map[string]int{}, release: make(chan struct{}), stopHB: make(chan struct{}), hbDone: make(chan struct{}),
		onAssign: make(chan schemas.AssignmentMsg, 1024)}
	if w.reg, err = registry.Open(ctx, js); err != nil {
		return nil, err
	}
	subject, serve := subjects.Assign(opts.ID), w.serve
	if opts.Direct {
		subject, serve = subjects.JobsAll, w.serveDirect
	}
	if w.sub, err = nc.Subscribe(subject, serve); err != nil {
		return nil, err
	}
	if err := nc.Flush(); err != nil {
		_ = w.sub.Unsubscribe()
		return nil, err
	}
	// Announce the models, as a real worker does before its first heartbeat, so
	// producers and the gateway tell them from models nobody serves.
	if models, err := js.KeyValue(ctx, subjects.BucketModels); err == nil {
		if err := registry.AnnounceModels(ctx, models, opts.Models); err != nil {
			_ = w.sub.Unsubscribe()
			return nil, err
		}
	} else if !errors.Is(err, jetstream.ErrBucketNotFound) {
		_ = w.sub.Unsubscribe()
		return nil, err
	}
	w.Heartbeat()
	go w.hbLoop()
	return w, nil
}

// ID is the worker id.
func (w *Worker) ID() string { return w.opts.ID }

// Conn is the worker's connection.
func (w *Worker) Conn() *nats.Conn { return w.nc }

// Stop ends serving and heart-beating, silently: the registry entry stays until
// it expires (idempotent).
func (w *Worker) Stop() {
	w.mu.Lock()
	if w.dead {
		w.mu.Unlock()
		return
	}
	w.dead = true
	w.mu.Unlock()
	close(w.stopHB)
	<-w.hbDone
	_ = w.sub.Unsubscribe()
}

// Mute stops answering assignments; the worker keeps heart-beating as ready
// (one whose assignments time out).
func (w *Worker) Mute() { _ = w.sub.Unsubscribe() }

// Deregister deletes the worker's registry entry (a clean shutdown).
func (w *Worker) Deregister(ctx context.Context) error { return w.reg.Delete(ctx, w.opts.ID) }

func (w *Worker) hbLoop() {
	defer close(w.hbDone)
	t := time.NewTicker(w.opts.HeartbeatEvery)
	defer t.Stop()
	last := time.Now()
	for {
		select {
		case <-w.stopHB:
			return
		case <-t.C:
		case <-w.hbNudge:
			// The real worker's rate limit on the full → free put.
			if wait := w.opts.HeartbeatEvery/10 - time.Since(last); wait > 0 {
				select {
				case <-w.stopHB:
					return
				case <-time.After(wait):
				}
			}
		}
		w.Heartbeat()
		last = time.Now()
	}
}

// Heartbeat puts the worker's registry entry now.
func (w *Worker) Heartbeat() {
	w.hbMu.Lock()
	defer w.hbMu.Unlock()
	w.mu.Lock()
	if w.dead {
		w.mu.Unlock()
		return
	}
	// updated_at after in_flight is read, as the real worker does: a job freed
	// after updated_at was counted.
	hb := schemas.HeartbeatMsg{WorkerID: w.opts.ID, Hostname: w.opts.Hostname, Platform: "linux", Models: w.opts.Models, Slots: w.opts.Slots,
		InFlight: w.inflight, State: schemas.WorkerReady, StartedAt: w.startedAt, UpdatedAt: time.Now().UTC(), Prefixes: w.advertised}
	w.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = w.reg.Put(ctx, hb)
}

// Advertise sets the prefixes the next heartbeats carry.
func (w *Worker) Advertise(p []schemas.ModelPrefixes) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.advertised = p
}

// BeforeReply sets f to run after a batch is taken and before the answer
// leaves, on the worker's goroutine.
func (w *Worker) BeforeReply(f func(schemas.AssignmentMsg)) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.beforeReply = f
}

// Release lets every Block attempt finish (once).
func (w *Worker) Release() { close(w.release) }

// Assignments delivers accepted batches (buffered; extras are dropped).
func (w *Worker) Assignments() <-chan schemas.AssignmentMsg { return w.onAssign }

// StartedAt is when the current incarnation started.
func (w *Worker) StartedAt() time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.startedAt
}

// RestartNow is a SIGKILL and a restart under the same id, faster than any TTL:
// the new process knows none of the old one's jobs (their goroutines go quiet)
// and announces itself with a new started_at.
func (w *Worker) RestartNow() {
	w.mu.Lock()
	w.inc++
	w.inflight = 0
	// Strictly later than the old incarnation's, however coarse the clock.
	now := time.Now().UTC()
	if !now.After(w.startedAt) {
		now = w.startedAt.Add(time.Millisecond)
	}
	w.startedAt = now
	w.mu.Unlock()
	w.Heartbeat()
}

// current reports whether incarnation inc is still the running process.
func (w *Worker) current(inc int) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return !w.dead && w.inc == inc
}

func (w *Worker) errorf(format string, args ...any) {
	w.errs.Add(1)
	if w.opts.Errorf != nil {
		w.opts.Errorf(format, args...)
	}
}

func (w *Worker) serve(m *nats.Msg) {
	var a schemas.AssignmentMsg
	if err := json.Unmarshal(m.Data, &a); err != nil {
		w.errorf("worker %s: bad assignment: %v", w.opts.ID, err)
		return
	}
	scripted, stated := false, 0
	if w.opts.Full != nil {
		scripted, stated = w.opts.Full(a)
	}
	now := time.Now()
	w.mu.Lock()
	if w.dead {
		w.mu.Unlock()
		return
	}
	free := w.opts.Slots - w.inflight
	if scripted {
		free = stated
	}
	if scripted || len(a.Jobs) > free {
		w.stats.Fulls++
		w.mu.Unlock()
		data, _ := json.Marshal(schemas.AssignmentReplyMsg{BatchID: a.BatchID, WorkerID: w.opts.ID, Status: schemas.AssignFull, FreeSlots: free})
		_ = m.Respond(data)
		return
	}
	w.inflight += len(a.Jobs)
	w.stats.MaxBatch = max(w.stats.MaxBatch, len(a.Jobs))
	w.batches = append(w.batches, a)
	for _, aj := range a.Jobs {
		w.assigned[aj.Job.ID]++
		w.order = append(w.order, aj.Job.ID)
		if aj.Job.CreatedAt != nil {
			w.stats.Latencies = append(w.stats.Latencies, now.Sub(*aj.Job.CreatedAt))
		}
	}
	free = w.opts.Slots - w.inflight
	inc, hook := w.inc, w.beforeReply
	w.mu.Unlock()
	if hook != nil {
		hook(a)
	}
	data, _ := json.Marshal(schemas.AssignmentReplyMsg{BatchID: a.BatchID, WorkerID: w.opts.ID, Status: schemas.AssignAccepted, FreeSlots: free})
	_ = m.Respond(data)
	select {
	case w.onAssign <- a:
	default:
	}
	if !w.opts.Quiet {
		w.Heartbeat()
	}
	for _, aj := range a.Jobs {
		go w.run(aj, a.DispatcherID, inc)
	}
}

func (w *Worker) done(inc int) {
	w.mu.Lock()
	if w.inc != inc {
		w.mu.Unlock()
		return // the slot went with the old process
	}
	wasFull := w.inflight == w.opts.Slots
	w.inflight--
	w.mu.Unlock()
	switch {
	case !w.opts.Quiet:
		w.Heartbeat()
	case wasFull && !w.opts.Silent:
		select {
		case w.hbNudge <- struct{}{}:
		default:
		}
	}
}

// Dead reports whether the worker stopped (Stop, or a Die plan).
func (w *Worker) Dead() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.dead
}

// InFlight is the number of jobs holding a slot.
func (w *Worker) InFlight() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.inflight
}

// Errors counts bad assignments and hand-overs that failed or were not
// answered stored.
func (w *Worker) Errors() int64 { return w.errs.Load() }

// Snapshot is what was assigned: attempts per job id, job ids in assignment
// order, and the accepted batches.
func (w *Worker) Snapshot() (assigned map[string]int, order []string, batches []schemas.AssignmentMsg) {
	w.mu.Lock()
	defer w.mu.Unlock()
	assigned = make(map[string]int, len(w.assigned))
	for k, v := range w.assigned {
		assigned[k] = v
	}
	return assigned, append([]string(nil), w.order...), append([]schemas.AssignmentMsg(nil), w.batches...)
}

// Stats is a copy of what the worker saw.
func (w *Worker) Stats() Stats {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := w.stats
	s.Latencies = append([]time.Duration(nil), s.Latencies...)
	s.Refused = append([]string(nil), s.Refused...)
	return s
}
