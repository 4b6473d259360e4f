package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// testEnv is one embedded server per test, provisioned by bus.Provision.
type testEnv struct {
	tb  testing.TB
	srv *bus.Server
	nc  *nats.Conn
	js  jetstream.JetStream
	kv  jetstream.KeyValue
}

func newEnv(tb testing.TB, popts bus.ProvisionOptions) *testEnv {
	tb.Helper()
	return newEnvWith(tb, bus.ServerOptions{}, popts)
}

// newEnvWith is newEnv on a server with sopts (port and store are the test's).
func newEnvWith(tb testing.TB, sopts bus.ServerOptions, popts bus.ProvisionOptions) *testEnv {
	tb.Helper()
	if popts.WorkerTTL == 0 {
		popts.WorkerTTL = time.Minute // staleness is the dispatcher's WorkerTTL in tests
	}
	b := testenv.StartBusWith(tb, testenv.BusOptions{Server: sopts, Provision: popts, Connect: bus.ConnectOptions{Name: "test"}})
	return &testEnv{tb: tb, srv: b.Server, nc: b.Conn, js: b.JS, kv: b.Workers}
}

func (e *testEnv) connect(name string) *nats.Conn {
	e.tb.Helper()
	return testenv.ConnectWith(e.tb, bus.ConnectOptions{URLs: []string{e.srv.ClientURL()}, Name: name})
}

// testConfig is fast enough for tests: short TTLs, short backoff.
func testConfig(id string, nc *nats.Conn) Config {
	l := zerolog.Nop()
	if os.Getenv("DISPATCHER_TEST_LOG") != "" {
		l = zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr}).With().Timestamp().Logger()
	}
	return Config{
		DispatcherID: id, Conn: nc,
		MaxWait: 20 * time.Millisecond, MaxBatch: 8, MaxAttempts: 3,
		AckWait: 2 * time.Second, AssignTimeout: 2 * time.Second, WorkerTTL: 600 * time.Millisecond,
		BackoffInitial: 20 * time.Millisecond, BackoffMax: 100 * time.Millisecond,
		BreakerCooldown: 200 * time.Millisecond, DrainTimeout: 5 * time.Second,
		Logger: &l,
	}
}

// runDispatcher starts d.Run; the returned stop cancels it and waits.
func runDispatcher(tb testing.TB, cfg Config) (*Dispatcher, func()) {
	tb.Helper()
	d, err := New(cfg)
	if err != nil {
		tb.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					tb.Errorf("Run: %v", err)
				}
			case <-time.After(20 * time.Second):
				tb.Errorf("Run did not return")
			}
		})
	}
	tb.Cleanup(stop)
	return d, stop
}

func newJob(id, model, priority string) *schemas.JobRequest {
	return &schemas.JobRequest{ID: id, Model: model, Prompt: "hello", MaxTokens: 5, Priority: priority, ReplyTo: bus.ReplySubject("", id)}
}

// submit publishes a job the way the producer does (its tenant's subject).
func (e *testEnv) submit(j *schemas.JobRequest) error {
	data, _ := json.Marshal(j)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := e.js.Publish(ctx, bus.JobSubject(j.Tenant, j.Priority, j.ID), data)
	return err
}

func (e *testEnv) mustSubmit(j *schemas.JobRequest) {
	e.tb.Helper()
	if err := e.submit(j); err != nil {
		e.tb.Fatalf("submit %s: %v", j.ID, err)
	}
}

func (e *testEnv) result(id string) (*schemas.ResultMsg, error) { return e.tenantResult("", id) }

func (e *testEnv) tenantResult(tenant, id string) (*schemas.ResultMsg, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return bus.FetchResult(ctx, e.js, tenant, id)
}

// waitResult polls RESULTS until the job has its record.
func (e *testEnv) waitResult(id string, within time.Duration) *schemas.ResultMsg {
	e.tb.Helper()
	return e.waitTenantResult("", id, within)
}

// waitTenantResult polls RESULTS until the job of tenant has its record.
func (e *testEnv) waitTenantResult(tenant, id string, within time.Duration) *schemas.ResultMsg {
	e.tb.Helper()
	deadline := time.Now().Add(within)
	for {
		r, err := e.tenantResult(tenant, id)
		if err == nil {
			return r
		}
		if !errors.Is(err, bus.ErrNoResult) {
			e.tb.Fatalf("result %s: %v", id, err)
		}
		if time.Now().After(deadline) {
			e.tb.Fatalf("no result for %s within %v", id, within)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (e *testEnv) streamMsgs(name string) uint64 {
	s, err := e.js.Stream(context.Background(), name)
	if err != nil {
		e.tb.Fatalf("stream %s: %v", name, err)
	}
	info, err := s.Info(context.Background())
	if err != nil {
		e.tb.Fatalf("stream info %s: %v", name, err)
	}
	return info.State.Msgs
}

// caller collects what a producer sees on a reply subject.
type caller struct {
	mu     sync.Mutex
	events []schemas.TokenEventMsg
	result *schemas.ResultMsg
	done   chan struct{}
}

func (e *testEnv) listen(replyTo string) *caller {
	e.tb.Helper()
	c := &caller{done: make(chan struct{})}
	sub, err := e.nc.Subscribe(replyTo, func(m *nats.Msg) {
		var head struct {
			Type string `json:"type"`
		}
		_ = json.Unmarshal(m.Data, &head)
		c.mu.Lock()
		defer c.mu.Unlock()
		if head.Type == "result" {
			var r schemas.ResultMsg
			_ = json.Unmarshal(m.Data, &r)
			if c.result == nil {
				c.result = &r
				close(c.done)
			} else {
				e.tb.Errorf("second terminal event on %s", replyTo)
			}
			return
		}
		var ev schemas.TokenEventMsg
		_ = json.Unmarshal(m.Data, &ev)
		c.events = append(c.events, ev)
	})
	if err != nil {
		e.tb.Fatalf("subscribe: %v", err)
	}
	_ = e.nc.Flush()
	e.tb.Cleanup(func() { _ = sub.Unsubscribe() })
	return c
}

func (c *caller) wait(tb testing.TB, within time.Duration) *schemas.ResultMsg {
	tb.Helper()
	select {
	case <-c.done:
	case <-time.After(within):
		tb.Fatalf("no terminal event within %v", within)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.result
}

func (c *caller) text() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var b strings.Builder
	for _, ev := range c.events {
		b.WriteString(ev.Delta)
	}
	return b.String()
}

// ---- fake worker ----

// jobPlan says how the fake worker runs one attempt.
type jobPlan struct {
	die      int  // >0: after this many tokens stop heart-beating and serving, silently
	restart  int  // >0: after this many tokens the worker restarts (SIGKILL and back under the same id): its jobs are forgotten, it serves and heart-beats on with a new started_at
	crash    int  // >0: after this many tokens report a retryable failure
	block    bool // wait for release before finishing
	tokenGap time.Duration
}

// fakeWorker serves mlx.worker.<id>.assign over real NATS, heart-beats into the
// KV, streams deterministic tokens ("t0 t1 ...") and records results.
type fakeWorker struct {
	tb     testing.TB
	id     string
	nc     *nats.Conn
	js     jetstream.JetStream
	kv     jetstream.KeyValue
	slots  int
	models []string
	plan   func(aj schemas.AssignedJob) jobPlan
	opts   fakeWorkerOptions

	hbMu      sync.Mutex // one put at a time, so entries reach the bucket in the order they were built
	mu        sync.Mutex
	startedAt time.Time // of the current incarnation (process)
	inc       int       // incarnation: bumped by restartNow
	inflight  int
	maxBatch  int
	overSlots int
	fulls     int
	assigned  map[string]int // job id -> attempts started here
	order     []string       // job ids in assignment order
	batches   []schemas.AssignmentMsg
	dead      bool
	refused   []string // "<job-id>:<answer>" of hand-overs not answered stored
	release   chan struct{}
	onAssign  chan schemas.AssignmentMsg
	sub       *nats.Subscription
	stopHB    chan struct{}
	hbDone    chan struct{}
	hbNudge   chan struct{} // quiet mode: the worker went from full to a free slot
	// beforeReply, if set, runs after a batch is taken and before the answer
	// leaves (read under mu).
	beforeReply func(a schemas.AssignmentMsg)
	latencies   []time.Duration
	// advertised: the heartbeat's prefixes (routing hints), set by tests.
	advertised []schemas.ModelPrefixes
}

// fakeWorkerOptions shape the fake worker's heartbeat.
type fakeWorkerOptions struct {
	hbEvery time.Duration // period of the registry put (100ms)
	// quiet: no extra put on every accept and finish, only the period and
	// full → free (rate-limited like the real worker)
	quiet bool
	// silent: not even the full → free put: one heartbeat at start, then one
	// per hbEvery
	silent bool
}

func (e *testEnv) startWorker(id string, slots int, models []string, plan func(schemas.AssignedJob) jobPlan) *fakeWorker {
	e.tb.Helper()
	return e.startWorkerWith(id, slots, models, plan, fakeWorkerOptions{})
}

func (e *testEnv) startWorkerWith(id string, slots int, models []string, plan func(schemas.AssignedJob) jobPlan, opts fakeWorkerOptions) *fakeWorker {
	e.tb.Helper()
	if opts.hbEvery <= 0 {
		opts.hbEvery = 100 * time.Millisecond
	}
	w := &fakeWorker{tb: e.tb, id: id, nc: e.connect("worker-" + id), slots: slots, models: models, plan: plan, opts: opts,
		startedAt: time.Now().UTC(), hbNudge: make(chan struct{}, 1),
		assigned: map[string]int{}, release: make(chan struct{}), stopHB: make(chan struct{}), hbDone: make(chan struct{}),
		onAssign: make(chan schemas.AssignmentMsg, 1024)}
	w.js, _ = jetstream.New(w.nc)
	w.kv, _ = w.js.KeyValue(context.Background(), bus.BucketWorkers)
	if w.plan == nil {
		w.plan = func(schemas.AssignedJob) jobPlan { return jobPlan{} }
	}
	var err error
	if w.sub, err = w.nc.Subscribe(bus.AssignSubject(id), w.serve); err != nil {
		e.tb.Fatalf("worker subscribe: %v", err)
	}
	_ = w.nc.Flush()
	w.heartbeat()
	go w.hbLoop()
	e.tb.Cleanup(w.stop)
	return w
}

func (w *fakeWorker) stop() {
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

func (w *fakeWorker) hbLoop() {
	defer close(w.hbDone)
	t := time.NewTicker(w.opts.hbEvery)
	defer t.Stop()
	last := time.Now()
	for {
		select {
		case <-w.stopHB:
			return
		case <-t.C:
		case <-w.hbNudge:
			// The real worker's rate limit on the full → free put.
			if wait := w.opts.hbEvery/10 - time.Since(last); wait > 0 {
				select {
				case <-w.stopHB:
					return
				case <-time.After(wait):
				}
			}
		}
		w.heartbeat()
		last = time.Now()
	}
}

func (w *fakeWorker) heartbeat() {
	w.hbMu.Lock()
	defer w.hbMu.Unlock()
	w.mu.Lock()
	if w.dead {
		w.mu.Unlock()
		return
	}
	// updated_at after in_flight is read, as the real worker does: a job freed
	// after updated_at was counted.
	hb := schemas.HeartbeatMsg{WorkerID: w.id, Hostname: "test", Platform: "linux", Models: w.models, Slots: w.slots,
		InFlight: w.inflight, State: schemas.WorkerReady, StartedAt: w.startedAt, UpdatedAt: time.Now().UTC(), Prefixes: w.advertised}
	w.mu.Unlock()
	data, _ := json.Marshal(hb)
	_, _ = w.kv.Put(context.Background(), w.id, data)
}

// restartNow is a SIGKILL and a restart under the same id, faster than any TTL:
// the new process knows none of the old one's jobs (their goroutines go quiet)
// and announces itself with a new started_at.
func (w *fakeWorker) restartNow() {
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
	w.heartbeat()
}

// current reports whether incarnation inc is still the running process.
func (w *fakeWorker) current(inc int) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return !w.dead && w.inc == inc
}

func (w *fakeWorker) serve(m *nats.Msg) {
	var a schemas.AssignmentMsg
	if err := json.Unmarshal(m.Data, &a); err != nil {
		w.tb.Errorf("worker %s: bad assignment: %v", w.id, err)
		return
	}
	now := time.Now()
	w.mu.Lock()
	if w.dead {
		w.mu.Unlock()
		return
	}
	free := w.slots - w.inflight
	if len(a.Jobs) > free {
		w.fulls++
		w.mu.Unlock()
		data, _ := json.Marshal(schemas.AssignmentReplyMsg{BatchID: a.BatchID, WorkerID: w.id, Status: schemas.AssignFull, FreeSlots: free})
		_ = m.Respond(data)
		return
	}
	w.inflight += len(a.Jobs)
	w.maxBatch = max(w.maxBatch, len(a.Jobs))
	w.batches = append(w.batches, a)
	for _, aj := range a.Jobs {
		w.assigned[aj.Job.ID]++
		w.order = append(w.order, aj.Job.ID)
		if aj.Job.CreatedAt != nil {
			w.latencies = append(w.latencies, now.Sub(*aj.Job.CreatedAt))
		}
	}
	free = w.slots - w.inflight
	inc, hook := w.inc, w.beforeReply
	w.mu.Unlock()
	if hook != nil {
		hook(a)
	}
	data, _ := json.Marshal(schemas.AssignmentReplyMsg{BatchID: a.BatchID, WorkerID: w.id, Status: schemas.AssignAccepted, FreeSlots: free})
	_ = m.Respond(data)
	select {
	case w.onAssign <- a:
	default:
	}
	if !w.opts.quiet {
		w.heartbeat()
	}
	for _, aj := range a.Jobs {
		go w.run(aj, a.DispatcherID, inc)
	}
}

// tokenText is the deterministic text of token i.
func tokenText(i int) string { return fmt.Sprintf("t%d ", i) }

func fullText(n int) string {
	var b strings.Builder
	for i := range n {
		b.WriteString(tokenText(i))
	}
	return b.String()
}

func (w *fakeWorker) run(aj schemas.AssignedJob, dispatcherID string, inc int) {
	plan := w.plan(aj)
	job := aj.Job
	start, prefix := 0, ""
	if aj.Resume != nil {
		start, prefix = aj.Resume.CompletionTokens, aj.Resume.Text
	}
	text := prefix
	seq := 0
	for i := start; i < job.MaxTokens; i++ {
		if plan.tokenGap > 0 {
			time.Sleep(plan.tokenGap)
		}
		if !w.current(inc) {
			return
		}
		d := tokenText(i)
		text += d
		ev, _ := json.Marshal(schemas.TokenEventMsg{Type: "token", JobID: job.ID, Attempt: aj.Attempt, Seq: seq, Delta: d, Tokens: i + 1})
		_ = w.nc.Publish(job.ReplyTo, ev)
		seq++
		if plan.restart > 0 && seq == plan.restart {
			_ = w.nc.Flush()
			w.restartNow()
			return
		}
		if plan.die > 0 && seq == plan.die {
			_ = w.nc.Flush()
			w.stop() // silent death: no result, no report, no more heartbeats
			return
		}
		if plan.crash > 0 && seq == plan.crash {
			// Like the real worker: stamped, the slot freed, then published.
			rep, _ := json.Marshal(schemas.AttemptReportMsg{JobID: job.ID, Tenant: job.Tenant, Attempt: aj.Attempt, WorkerID: w.id,
				Error: schemas.ErrorInfo{Code: "runtime_crashed", Message: "boom", Retryable: true}, Text: text, Seq: seq, CompletionTokens: i + 1, ReportedAt: time.Now().UTC()})
			w.done(inc)
			_ = w.nc.Publish(bus.AttemptSubject(w.id), rep)
			return
		}
	}
	if plan.block {
		<-w.release
	}
	if !w.current(inc) {
		return
	}
	// Like the real worker: finished_at stamped, the slot freed, then the record.
	res := &schemas.ResultMsg{Type: "result", JobID: job.ID, Attempt: aj.Attempt, Seq: seq, Status: schemas.StatusCompleted, FinishReason: "length",
		Text: text, Usage: schemas.Usage{CompletionTokens: job.MaxTokens, TotalTokens: job.MaxTokens}, Model: job.Model, Tenant: job.Tenant, WorkerID: w.id, FinishedAt: time.Now().UTC()}
	w.done(inc)
	// Like the real worker: handed to the dispatcher that placed the job.
	data, _ := json.Marshal(res)
	m, err := w.nc.Request(bus.DoneSubject(w.id, dispatcherID), data, 10*time.Second)
	var reply schemas.FinishReplyMsg
	if err == nil {
		err = json.Unmarshal(m.Data, &reply)
	}
	switch {
	case err != nil:
		if !errors.Is(err, nats.ErrNoResponders) { // a stopped dispatcher
			w.tb.Logf("worker %s: hand over %s: %v", w.id, job.ID, err)
		}
	case reply.Status != schemas.FinishStored:
		w.mu.Lock()
		w.refused = append(w.refused, job.ID+":"+reply.Status)
		w.mu.Unlock()
	}
}

func (w *fakeWorker) done(inc int) {
	w.mu.Lock()
	if w.inc != inc {
		w.mu.Unlock()
		return // the slot went with the old process
	}
	wasFull := w.inflight == w.slots
	w.inflight--
	w.mu.Unlock()
	switch {
	case !w.opts.quiet:
		w.heartbeat()
	case wasFull && !w.opts.silent:
		select {
		case w.hbNudge <- struct{}{}:
		default:
		}
	}
}

func (w *fakeWorker) isDead() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.dead
}

func (w *fakeWorker) snapshot() (assigned map[string]int, order []string, batches []schemas.AssignmentMsg) {
	w.mu.Lock()
	defer w.mu.Unlock()
	assigned = make(map[string]int, len(w.assigned))
	for k, v := range w.assigned {
		assigned[k] = v
	}
	return assigned, append([]string(nil), w.order...), append([]schemas.AssignmentMsg(nil), w.batches...)
}

// waitFor polls cond (state owned by other goroutines) until it holds.
func waitFor(tb testing.TB, within time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func testConfigLogger() *zerolog.Logger {
	l := zerolog.Nop()
	if os.Getenv("DISPATCHER_TEST_LOG") != "" {
		l = zerolog.New(os.Stderr)
	}
	return &l
}
