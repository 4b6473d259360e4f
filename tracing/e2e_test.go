package tracing_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/mlx-serving/mlx-serving/dispatcher"
	"github.com/mlx-serving/mlx-serving/gateway"
	"github.com/mlx-serving/mlx-serving/gateway/gatewaybus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/tracing"
	"github.com/mlx-serving/mlx-serving/worker"
)

// ended is a span processor that says when a span of a given name has ended,
// so the test waits on the spans themselves rather than on time.
type ended struct {
	sdktrace.SpanProcessor
	mu    sync.Mutex
	names map[string]int
	ch    chan struct{}
}

func (e *ended) OnEnd(s sdktrace.ReadOnlySpan) {
	e.SpanProcessor.OnEnd(s)
	e.mu.Lock()
	e.names[s.Name()]++
	e.mu.Unlock()
	select {
	case e.ch <- struct{}{}:
	default:
	}
}

func (e *ended) waitFor(ctx context.Context, names ...string) bool {
	for {
		e.mu.Lock()
		all := true
		for _, n := range names {
			all = all && e.names[n] > 0
		}
		e.mu.Unlock()
		if all {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-e.ch:
		}
	}
}

// One request with a caller's traceparent through the real system: gateway,
// embedded JetStream, a dispatcher, a worker and its Python runtime on the
// tiny model. Every hop's span belongs to the caller's trace, each the child
// of the one before, and the worker's span carries the runtime's timings.
func TestTraceFollowsAJobThroughTheSystem(t *testing.T) {
	resetGlobals(t)
	exp := tracetest.NewInMemoryExporter()
	rec := &ended{SpanProcessor: sdktrace.NewSimpleSpanProcessor(exp), names: map[string]int{}, ch: make(chan struct{}, 1)}
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()); resetGlobals(t) })
	tracing.Install(tp)

	b := testenv.StartBus(t, jsprov.Options{WorkerTTL: 3 * time.Second})
	runDispatcher(t, b)
	runWorker(t, b)
	gb, err := gatewaybus.New(testenv.Connect(t, b.Server.ClientURL()), gatewaybus.Options{Logger: testenv.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	g, err := gateway.New(gateway.Config{Jobs: gb, Fleet: gb.Fleet(), Logger: testenv.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(g.Handler())
	t.Cleanup(srv.Close)

	const callerTrace, callerSpan = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	ctx := testenv.Context(t, 2*time.Minute)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/completions",
		strings.NewReader(`{"model":"tiny","prompt":"Once upon a time","max_tokens":8}`))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("traceparent", "00-"+callerTrace+"-"+callerSpan+"-01")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("completion: %s", resp.Status)
	}
	jobID := resp.Header.Get("X-Mlx-Job-Id")

	if !rec.waitFor(ctx, tracing.SpanGatewayRequest, tracing.SpanSubmit, tracing.SpanDispatch, tracing.SpanGenerate) {
		t.Fatalf("not every span ended; got %v", rec.names)
	}
	spans := map[string]tracetest.SpanStub{}
	for _, s := range exp.GetSpans() {
		if _, dup := spans[s.Name]; dup {
			t.Errorf("span %s recorded twice", s.Name)
		}
		spans[s.Name] = s
	}
	gw, sub, dis, gen := spans[tracing.SpanGatewayRequest], spans[tracing.SpanSubmit], spans[tracing.SpanDispatch], spans[tracing.SpanGenerate]

	for _, s := range []tracetest.SpanStub{gw, sub, dis, gen} {
		if got := s.SpanContext.TraceID().String(); got != callerTrace {
			t.Errorf("%s: trace %s, want the caller's %s", s.Name, got, callerTrace)
		}
	}
	links := []struct {
		child  tracetest.SpanStub
		parent string
		kind   trace.SpanKind
	}{
		{gw, callerSpan, trace.SpanKindServer},
		{sub, gw.SpanContext.SpanID().String(), trace.SpanKindProducer},
		{dis, sub.SpanContext.SpanID().String(), trace.SpanKindConsumer},
		{gen, dis.SpanContext.SpanID().String(), trace.SpanKindConsumer},
	}
	for _, l := range links {
		if got := l.child.Parent.SpanID().String(); got != l.parent {
			t.Errorf("%s: parent %s, want %s", l.child.Name, got, l.parent)
		}
		if l.child.SpanKind != l.kind {
			t.Errorf("%s: kind %v, want %v", l.child.Name, l.child.SpanKind, l.kind)
		}
	}

	da := attrs(dis.Attributes)
	if da[tracing.AttrJobID] != jobID || jobID == "" || da[tracing.AttrModel] != "tiny" ||
		da[tracing.AttrAttempt] != int64(1) || da[tracing.AttrWorkerID] != "w1" || da[tracing.AttrBatchID] == "" {
		t.Errorf("dispatch attributes %v (job %s)", da, jobID)
	}
	if ga := attrs(gen.Attributes); ga[tracing.AttrJobID] != jobID || ga[tracing.AttrWorkerID] != "w1" {
		t.Errorf("generate attributes %v (job %s)", ga, jobID)
	}
	events := map[string]map[string]any{}
	for _, e := range gen.Events {
		events[e.Name] = attrs(e.Attributes)
	}
	if ft, ok := events[tracing.EventFirstToken]; !ok || ft[tracing.AttrTTFTMs].(float64) <= 0 {
		t.Errorf("generate: first_token event %v, want one with ttft_ms > 0", ft)
	}
	fin, ok := events[tracing.EventFinished]
	if !ok || fin[tracing.AttrCompletionTokens].(int64) <= 0 || fin[tracing.AttrTokensPerSec].(float64) <= 0 {
		t.Errorf("generate: finished event %v, want completion_tokens and tokens_per_s > 0", fin)
	}
	if gen.Status.Code != 0 {
		t.Errorf("generate: status %v on a completed job", gen.Status)
	}
}

func attrs(kvs []attribute.KeyValue) map[string]any {
	m := map[string]any{}
	for _, kv := range kvs {
		m[string(kv.Key)] = kv.Value.AsInterface()
	}
	return m
}

func runDispatcher(t *testing.T, b *testenv.Bus) {
	t.Helper()
	log := testenv.Logger(t)
	d, err := dispatcher.New(dispatcher.Config{DispatcherID: "d1", Conn: testenv.Connect(t, b.Server.ClientURL()),
		WorkerTTL: 3 * time.Second, Logger: &log})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = d.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
}

func runWorker(t *testing.T, b *testenv.Bus) {
	t.Helper()
	a, err := worker.New(worker.Config{
		WorkerID: "w1", Conn: testenv.Connect(t, b.Server.ClientURL()), Python: testenv.Python(t),
		Models: []string{"tiny=" + testenv.TinyModel(t)}, Slots: 1,
		HeartbeatInterval: 500 * time.Millisecond, Logger: testenv.Logger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	if err := a.WaitReady(testenv.Context(t, 2*time.Minute)); err != nil {
		t.Fatalf("worker not ready: %v", err)
	}
}
