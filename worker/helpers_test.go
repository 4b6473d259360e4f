package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// fakeRuntimeEnv makes the test binary act as a runtime (see TestMain), so the
// supervisor can be tested against a process without Python.
const fakeRuntimeEnv = "MLX_SERVING_FAKE_RUNTIME"

func TestMain(m *testing.M) {
	if os.Getenv(fakeRuntimeEnv) == "1" {
		delay, _ := time.ParseDuration(os.Getenv("FAKE_TOKEN_DELAY"))
		busy, _ := strconv.Atoi(os.Getenv("FAKE_BUSY_FIRST"))
		runFakeRuntime(os.Stdin, os.Stdout, fakeOptions{tokenDelay: delay, hangHealth: os.Getenv("FAKE_HANG_HEALTH") == "1", busyFirst: busy, failFirst: os.Getenv("FAKE_FAIL_FIRST")})
		os.Exit(0)
	}
	if os.Getenv(helperEnv) == "1" {
		runHelperAgent()
	}
	os.Exit(m.Run())
}

// processGone reports whether pid has exited (a zombie counts as gone: only its
// parent's wait is missing).
func processGone(pid int) bool {
	if b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); err == nil {
		if i := strings.LastIndexByte(string(b), ')'); i > 0 && i+2 < len(b) {
			return b[i+2] == 'Z' || b[i+2] == 'X'
		}
	}
	return syscall.Kill(pid, 0) != nil
}

// pythonPath and tinyModel are the real runtime's interpreter and the tiny model,
// shared with every end-to-end test (internal/testenv).
func pythonPath(t testing.TB) string { return testenv.Python(t) }

func tinyModel(t testing.TB) string { return testenv.TinyModel(t) }

func testLogger(t testing.TB) zerolog.Logger {
	if os.Getenv("WORKER_TEST_LOG") == "" {
		return zerolog.Nop()
	}
	return zerolog.New(zerolog.NewTestWriter(t)).With().Timestamp().Logger()
}

type testBus struct {
	srv *natsserver.Server
	nc  *nats.Conn
	js  jetstream.JetStream
	kv  jetstream.KeyValue
}

// startBus starts an embedded NATS server (internal/testenv), provisioned with
// workerTTL (10s when 0), and a stand-in dispatcher on it.
func startBus(t testing.TB, workerTTL time.Duration) *testBus {
	t.Helper()
	if workerTTL == 0 {
		workerTTL = 10 * time.Second
	}
	e := testenv.StartBus(t, jsprov.Options{WorkerTTL: workerTTL})
	b := &testBus{srv: e.Server, nc: e.Conn, js: e.JS, kv: e.Workers}
	b.standInDispatcher(t)
	return b
}

// standInDispatcher answers the hand-overs of jobs assigned by batch (dispatcher
// "test") the way a dispatcher does: the record is stored with results.Finish — in
// RESULTS, then as the last event on the job's reply subject — and only then
// answered. It records nothing it did not store.
func (b *testBus) standInDispatcher(t testing.TB) {
	sub, err := b.nc.Subscribe(subjects.DoneForDispatcher(testDispatcher), func(m *nats.Msg) {
		if err := schemas.Validate(schemas.Result, m.Data); err != nil {
			t.Errorf("hand-over on %s fails its schema: %v: %s", m.Subject, err, m.Data)
			return
		}
		var res schemas.ResultMsg
		_ = json.Unmarshal(m.Data, &res)
		if w := subjects.WorkerOf(m.Subject); w != res.WorkerID {
			t.Errorf("hand-over on %s names worker %q", m.Subject, res.WorkerID)
		}
		replyTo, _ := replyOf.Load(subjects.JobRef{Tenant: res.Tenant, ID: res.JobID}.Key())
		rt, _ := replyTo.(string)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		status := schemas.FinishStored
		if err := results.Finish(ctx, b.js, &res, rt); errors.Is(err, results.ErrResultExists) {
			status = schemas.FinishExists
		} else if err != nil {
			t.Errorf("stand-in dispatcher: finish %s: %v", res.JobID, err)
			return
		}
		data, _ := json.Marshal(schemas.FinishReplyMsg{JobID: res.JobID, Tenant: res.Tenant, Status: status})
		_ = m.Respond(data)
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := b.nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

// testDispatcher is the dispatcher id batch puts in assignments.
const testDispatcher = "test"

// replyOf maps a job's key to its reply subject, for the stand-in dispatcher.
var replyOf sync.Map

// cancelJob asks worker workerID to cancel a job, as its dispatcher would.
func cancelJob(t testing.TB, nc *nats.Conn, workerID string, j schemas.JobRequest) {
	t.Helper()
	cm, _ := json.Marshal(schemas.CancelMsg{JobID: j.ID, Tenant: j.Tenant, RequestedAt: time.Now().UTC()})
	if err := nc.PublishRequest(subjects.WorkerCancel(workerID), nc.NewInbox(), cm); err != nil { // as a dispatcher sends it (subjects.Sent)
		t.Fatal(err)
	}
}

// testConfig is a config with short timeouts for tests.
func testConfig(t testing.TB, b *testBus, id string) Config {
	return Config{
		WorkerID:              id,
		Conn:                  b.nc,
		Slots:                 4,
		HeartbeatInterval:     200 * time.Millisecond,
		HealthInterval:        500 * time.Millisecond,
		HealthTimeout:         5 * time.Second,
		StartTimeout:          60 * time.Second,
		LoadTimeout:           60 * time.Second,
		StopTimeout:           10 * time.Second,
		DrainTimeout:          30 * time.Second,
		ResultTimeout:         5 * time.Second,
		RestartBackoffInitial: 100 * time.Millisecond,
		RestartBackoffMax:     500 * time.Millisecond,
		BreakerWindow:         time.Minute,
		BreakerCooldown:       time.Minute,
		Logger:                testLogger(t),
	}
}

// realConfig runs the real runtime with the tiny model as "tiny".
func realConfig(t testing.TB, b *testBus, id string) Config {
	cfg := testConfig(t, b, id)
	cfg.Python = pythonPath(t)
	cfg.Models = []string{"tiny=" + tinyModel(t)}
	return cfg
}

// fakeConfig runs this test binary as the runtime.
func fakeConfig(t testing.TB, b *testBus, id string, tokenDelay time.Duration) Config {
	cfg := testConfig(t, b, id)
	cfg.Python = os.Args[0]
	cfg.RuntimeEnv = []string{fakeRuntimeEnv + "=1", "FAKE_TOKEN_DELAY=" + tokenDelay.String()}
	cfg.Models = []string{"tiny=/fake/tiny"}
	return cfg
}

func startAgent(t testing.TB, cfg Config, waitReady bool) *Agent {
	t.Helper()
	return startAgentWith(t, cfg, waitReady, nil)
}

// startAgentWith is startAgent with setup applied to the agent before it
// starts (e.g. a test's handOver).
func startAgentWith(t testing.TB, cfg Config, waitReady bool, setup func(*Agent)) *Agent {
	t.Helper()
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if setup != nil {
		setup(a)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = a.Shutdown(sctx)
	})
	if waitReady {
		if err := a.WaitReady(ctx); err != nil {
			t.Fatalf("worker not ready: %v (state %s, breaker %s)", err, a.State(), a.BreakerState())
		}
	}
	return a
}

// collector gathers one job's reply subject.
type collector struct {
	t      testing.TB
	ch     chan *nats.Msg
	tokens []schemas.TokenEventMsg
	result *schemas.ResultMsg
}

func collect(t testing.TB, nc *nats.Conn, subject string) *collector {
	t.Helper()
	ch := make(chan *nats.Msg, 4096)
	sub, err := nc.ChanSubscribe(subject, ch)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return &collector{t: t, ch: ch}
}

// next returns the next event, validated against its schema.
func (c *collector) next(ctx context.Context) (token *schemas.TokenEventMsg, result *schemas.ResultMsg) {
	c.t.Helper()
	select {
	case <-ctx.Done():
		c.t.Fatalf("no event on the reply subject: %v (have %d tokens)", ctx.Err(), len(c.tokens))
	case m := <-c.ch:
		var head struct {
			Type string `json:"type"`
		}
		if err := json.Unmarshal(m.Data, &head); err != nil {
			c.t.Fatalf("event is not JSON: %s", m.Data)
		}
		switch head.Type {
		case "token":
			if err := schemas.Validate(schemas.TokenEvent, m.Data); err != nil {
				c.t.Fatalf("token event fails its schema: %v: %s", err, m.Data)
			}
			var ev schemas.TokenEventMsg
			if err := json.Unmarshal(m.Data, &ev); err != nil {
				c.t.Fatal(err)
			}
			c.tokens = append(c.tokens, ev)
			return &ev, nil
		case "result":
			if err := schemas.Validate(schemas.Result, m.Data); err != nil {
				c.t.Fatalf("result fails its schema: %v: %s", err, m.Data)
			}
			var r schemas.ResultMsg
			if err := json.Unmarshal(m.Data, &r); err != nil {
				c.t.Fatal(err)
			}
			c.result = &r
			return nil, &r
		default:
			c.t.Fatalf("unknown event type %q: %s", head.Type, m.Data)
		}
	}
	return nil, nil
}

// untilResult reads events until the terminal result.
func (c *collector) untilResult(ctx context.Context) *schemas.ResultMsg {
	c.t.Helper()
	for {
		if _, r := c.next(ctx); r != nil {
			return r
		}
	}
}

// checkStream asserts seq 0..n-1 with no gaps, one attempt, and that the deltas
// add up to the result's text after the resume prefix.
func (c *collector) checkStream(prefix string) {
	c.t.Helper()
	var text strings.Builder
	for i, ev := range c.tokens {
		if ev.Seq != i {
			c.t.Fatalf("token %d has seq %d (gap or reorder)", i, ev.Seq)
		}
		if c.result != nil && ev.Attempt != c.result.Attempt {
			c.t.Fatalf("token %d has attempt %d, result %d", i, ev.Attempt, c.result.Attempt)
		}
		if ev.Delta == "" {
			c.t.Fatalf("token %d has an empty delta", i)
		}
		text.WriteString(ev.Delta)
	}
	if c.result != nil {
		if c.result.Seq != len(c.tokens) {
			c.t.Fatalf("result seq %d, want %d (the seq after the last token)", c.result.Seq, len(c.tokens))
		}
		if want := prefix + text.String(); c.result.Text != want {
			c.t.Fatalf("result text %q is not resume + deltas %q", c.result.Text, want)
		}
	}
}

// assign sends an assignment and returns the reply.
func assign(t testing.TB, nc *nats.Conn, workerID string, m *schemas.AssignmentMsg) *schemas.AssignmentReplyMsg {
	t.Helper()
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := nc.Request(subjects.Assign(workerID), b, 10*time.Second)
	if err != nil {
		t.Fatalf("assign: %v", err)
	}
	if err := schemas.Validate(schemas.AssignmentReply, msg.Data); err != nil {
		t.Fatalf("assignment reply fails its schema: %v: %s", err, msg.Data)
	}
	var r schemas.AssignmentReplyMsg
	if err := json.Unmarshal(msg.Data, &r); err != nil {
		t.Fatal(err)
	}
	return &r
}

var jobSeq struct {
	sync.Mutex
	n int
}

func newJob(prompt string, maxTokens int) schemas.JobRequest {
	jobSeq.Lock()
	jobSeq.n++
	n := jobSeq.n
	jobSeq.Unlock()
	id := fmt.Sprintf("job-%d-%d", time.Now().UnixNano(), n)
	now := time.Now().UTC()
	return schemas.JobRequest{
		ID: id, Model: "tiny", Prompt: prompt, MaxTokens: maxTokens,
		Priority: schemas.PriorityNormal, ReplyTo: bus.ReplySubject("test", id), CreatedAt: &now,
	}
}

func batch(model string, jobs ...schemas.JobRequest) *schemas.AssignmentMsg {
	m := &schemas.AssignmentMsg{BatchID: fmt.Sprintf("batch-%d", time.Now().UnixNano()), DispatcherID: testDispatcher, Model: model}
	for _, j := range jobs {
		replyOf.Store(subjects.JobRef{Tenant: j.Tenant, ID: j.ID}.Key(), j.ReplyTo)
		m.Jobs = append(m.Jobs, schemas.AssignedJob{Job: j, Attempt: 1})
	}
	return m
}

// fetchResult reads the RESULTS record of a job of no tenant, validated.
func fetchResult(t testing.TB, js jetstream.JetStream, jobID string) *schemas.ResultMsg {
	t.Helper()
	return fetchTenantResult(t, js, "", jobID)
}

// fetchTenantResult reads the RESULTS record of a job of tenant, validated.
func fetchTenantResult(t testing.TB, js jetstream.JetStream, tenant, jobID string) *schemas.ResultMsg {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := results.Fetch(ctx, js, tenant, jobID)
	if err != nil {
		t.Fatalf("RESULTS record of %s: %v", jobID, err)
	}
	return r
}

// resultsCount is how many records RESULTS holds for a job.
func resultsCount(t testing.TB, js jetstream.JetStream, jobID string) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, subjects.StreamResults)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(subjects.Result("", jobID)))
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Subjects[subjects.Result("", jobID)]
}

// waitHeartbeat waits for the registry entry to satisfy ok, watching the key.
func waitHeartbeat(t testing.TB, kv jetstream.KeyValue, id string, timeout time.Duration, ok func(*schemas.HeartbeatMsg) bool) *schemas.HeartbeatMsg {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	w, err := kv.Watch(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	var last *schemas.HeartbeatMsg
	for {
		select {
		case <-ctx.Done():
			t.Fatalf("heartbeat of %s never matched; last %+v", id, last)
		case e := <-w.Updates():
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue
			}
			if err := schemas.Validate(schemas.Heartbeat, e.Value()); err != nil {
				t.Fatalf("heartbeat fails its schema: %v: %s", err, e.Value())
			}
			var hb schemas.HeartbeatMsg
			if err := json.Unmarshal(e.Value(), &hb); err != nil {
				t.Fatal(err)
			}
			last = &hb
			if ok(&hb) {
				return &hb
			}
		}
	}
}

// waitNewRuntime returns once a serves on a runtime other than the one of pid
// (ready or busy on a new process), following its lifecycle changes.
func waitNewRuntime(t testing.TB, ctx context.Context, a *Agent, pid int) {
	t.Helper()
	for {
		st, ch := a.life.watch()
		if (st == StateReady || st == StateBusy) && a.RuntimePID() != pid && a.RuntimePID() != 0 {
			return
		}
		select {
		case <-ch:
		case <-ctx.Done():
			t.Fatalf("no new runtime (state %s, pid %d, old %d)", st, a.RuntimePID(), pid)
		}
	}
}

// attemptReports receives the attempt reports worker id sends from now on,
// until the test ends.
func attemptReports(t *testing.T, nc *nats.Conn, id string) <-chan *nats.Msg {
	t.Helper()
	ch := make(chan *nats.Msg, 16)
	sub, err := nc.ChanSubscribe(subjects.Attempt(id), ch)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return ch
}
