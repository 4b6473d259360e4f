package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// testEnv is one embedded server per test, provisioned by jsprov.Provision.
type testEnv struct {
	tb  testing.TB
	srv *natsserver.Server
	nc  *nats.Conn
	js  jetstream.JetStream
	kv  jetstream.KeyValue
}

func newEnv(tb testing.TB, popts jsprov.Options) *testEnv {
	tb.Helper()
	return newEnvWith(tb, natsserver.Options{}, popts)
}

// newEnvWith is newEnv on a server with sopts (port and store are the test's).
func newEnvWith(tb testing.TB, sopts natsserver.Options, popts jsprov.Options) *testEnv {
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
	return d, runNew(tb, d)
}

// runNew starts d.Run; the returned stop cancels it and waits.
func runNew(tb testing.TB, d *Dispatcher) func() {
	tb.Helper()
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
	return stop
}

func newJob(id, model, priority string) *schemas.JobRequest {
	return &schemas.JobRequest{ID: id, Model: model, Prompt: "hello", MaxTokens: 5, Priority: priority, ReplyTo: bus.ReplySubject("", id)}
}

// submit publishes a job the way the producer does (its tenant's subject).
func (e *testEnv) submit(j *schemas.JobRequest) error {
	data, _ := json.Marshal(j)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := e.js.Publish(ctx, subjects.Job(j.Tenant, j.Priority, j.ID), data)
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
	return results.Fetch(ctx, e.js, tenant, id)
}

// waitResult polls RESULTS until the job has its record.
func (e *testEnv) waitResult(id string, within time.Duration) *schemas.ResultMsg {
	e.tb.Helper()
	return e.waitTenantResult("", id, within)
}

// waitResultAfter submits j and waits for its terminal event on its reply subject.
func (e *testEnv) waitResultAfter(j *schemas.JobRequest, within time.Duration) *schemas.ResultMsg {
	e.tb.Helper()
	c := e.listen(j.ReplyTo)
	e.mustSubmit(j)
	return c.wait(e.tb, within)
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

// ---- fake worker (internal/fakeworker) ----

type (
	fakeWorker        = fakeworker.Worker
	jobPlan           = fakeworker.Plan
	fakeWorkerOptions = fakeworker.Options
)

// tokenText and fullText are the fake worker's deterministic text.
var tokenText, fullText = fakeworker.TokenText, fakeworker.FullText

func (e *testEnv) startWorker(id string, slots int, models []string, plan func(schemas.AssignedJob) jobPlan) *fakeWorker {
	e.tb.Helper()
	return e.startWorkerWith(id, slots, models, plan, fakeWorkerOptions{})
}

// startWorkerWith starts a fake worker on a connection of its own, stopped in
// tb.Cleanup; opts shape its heartbeat.
func (e *testEnv) startWorkerWith(id string, slots int, models []string, plan func(schemas.AssignedJob) jobPlan, opts fakeWorkerOptions) *fakeWorker {
	e.tb.Helper()
	opts.ID, opts.Slots, opts.Models, opts.Plan = id, slots, models, plan
	opts.Errorf, opts.Logf = e.tb.Errorf, e.tb.Logf
	w, err := fakeworker.Start(context.Background(), e.connect("worker-"+id), opts)
	if err != nil {
		e.tb.Fatalf("fake worker %s: %v", id, err)
	}
	e.tb.Cleanup(w.Stop)
	return w
}

// cancelsTo receives the cancels dispatchers forward to worker id (which a
// fake worker ignores), from now on.
func (e *testEnv) cancelsTo(id string) <-chan *nats.Msg {
	e.tb.Helper()
	ch := make(chan *nats.Msg, 16)
	sub, err := e.nc.ChanSubscribe(subjects.WorkerCancel(id), ch)
	if err != nil {
		e.tb.Fatal(err)
	}
	e.tb.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := e.nc.Flush(); err != nil {
		e.tb.Fatal(err)
	}
	return ch
}

// checkNeverOverfilled: w was never offered more jobs than its slots (no
// batch above them, none answered full) and took assignments attempts.
func checkNeverOverfilled(tb testing.TB, w *fakeWorker, slots, assignments int) {
	tb.Helper()
	st := w.Stats()
	if st.MaxBatch > slots || st.Fulls != 0 {
		tb.Fatalf("largest batch %d for %d slots, %d refused as full", st.MaxBatch, slots, st.Fulls)
	}
	if _, order, _ := w.Snapshot(); len(order) != assignments {
		tb.Fatalf("%d assignments, want %d", len(order), assignments)
	}
}

// waitFor is testenv.WaitFor (the name every test here calls).
func waitFor(tb testing.TB, within time.Duration, what string, cond func() bool) {
	tb.Helper()
	testenv.WaitFor(tb, within, what, cond)
}

func testConfigLogger() *zerolog.Logger {
	l := zerolog.Nop()
	if os.Getenv("DISPATCHER_TEST_LOG") != "" {
		l = zerolog.New(os.Stderr)
	}
	return &l
}

// logSignal returns a logger (testConfigLogger's, or a silent one) that closes
// the returned channel the first time the dispatcher logs msg: how a test
// waits for what the dispatcher reports only in its log — it is running, an
// attach failed — instead of sleeping and hoping it happened by then.
func logSignal(msg string) (*zerolog.Logger, <-chan struct{}) {
	ch := make(chan struct{})
	var once sync.Once
	base := *testConfigLogger()
	if base.GetLevel() == zerolog.Disabled {
		base = zerolog.New(io.Discard)
	}
	l := base.Hook(zerolog.HookFunc(func(_ *zerolog.Event, _ zerolog.Level, m string) {
		if m == msg {
			once.Do(func() { close(ch) })
		}
	}))
	return &l, ch
}

// logRunning is what Run logs once its subscriptions are live on the server
// and the stored cancels are read: a cancel published after it is acted on.
const logRunning = "dispatcher running"

// waitClosed waits for ch (a logSignal) to close.
func waitClosed(tb testing.TB, ch <-chan struct{}, within time.Duration, what string) {
	tb.Helper()
	select {
	case <-ch:
	case <-time.After(within):
		tb.Fatalf("timed out after %v waiting for %s", within, what)
	}
}
