package tracing_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/protobuf/proto"

	"github.com/mlx-serving/mlx-serving/tracing"
)

// The tests of this package swap otel's global provider and propagator, so
// none of them runs in parallel.

func resetGlobals(t *testing.T) {
	t.Helper()
	otel.SetTracerProvider(noop.NewTracerProvider())
	// Baggage is comparable (a composite is not) and writes nothing here.
	otel.SetTextMapPropagator(propagation.Baggage{})
}

func TestSetupWithoutEndpointInstallsNothing(t *testing.T) {
	resetGlobals(t)
	tp, prop := otel.GetTracerProvider(), otel.GetTextMapPropagator()
	shutdown, err := tracing.Setup(context.Background(), tracing.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if otel.GetTracerProvider() != tp || otel.GetTextMapPropagator() != prop {
		t.Fatal("Setup without an endpoint replaced the global provider or propagator")
	}
	ctx, span := tracing.Tracer().Start(context.Background(), "x")
	defer span.End()
	if span.IsRecording() {
		t.Error("span records with tracing off")
	}
	h := nats.Header{}
	tracing.InjectHeader(ctx, h)
	if len(h) != 0 || tracing.Traceparent(ctx) != "" {
		t.Errorf("tracing off but context propagated: header %v, traceparent %q", h, tracing.Traceparent(ctx))
	}
	if err := shutdown(context.Background()); err != nil {
		t.Error(err)
	}
}

func TestSetupRejectsNonHTTPEndpoint(t *testing.T) {
	resetGlobals(t)
	for _, ep := range []string{"127.0.0.1:4318", "grpc://127.0.0.1:4317", "http://"} {
		if _, err := tracing.Setup(context.Background(), tracing.Options{Endpoint: ep}); !errors.Is(err, tracing.ErrBadEndpoint) {
			t.Errorf("Setup(%q) = %v, want ErrBadEndpoint", ep, err)
		}
	}
}

// A real OTLP/HTTP request reaches the collector: the span named here, under
// the service name, decoded from the protobuf body.
func TestSetupExportsOverOTLPHTTP(t *testing.T) {
	resetGlobals(t)
	var (
		mu    sync.Mutex
		names []string
		svc   string
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/v1/traces" {
			http.NotFound(w, r)
			return
		}
		body, _ := io.ReadAll(r.Body)
		var req collectortrace.ExportTraceServiceRequest
		if err := proto.Unmarshal(body, &req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		mu.Lock()
		for _, rs := range req.ResourceSpans {
			for _, a := range rs.GetResource().GetAttributes() {
				if a.Key == "service.name" {
					svc = a.GetValue().GetStringValue()
				}
			}
			for _, ss := range rs.ScopeSpans {
				for _, s := range ss.Spans {
					names = append(names, s.Name)
				}
			}
		}
		mu.Unlock()
		w.Header().Set("Content-Type", "application/x-protobuf")
		out, _ := proto.Marshal(&collectortrace.ExportTraceServiceResponse{})
		_, _ = w.Write(out)
	}))
	defer srv.Close()

	shutdown, err := tracing.Setup(context.Background(), tracing.Options{Endpoint: srv.URL, ServiceName: "mlx-serving-test"})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := otel.GetTracerProvider().(*sdktrace.TracerProvider); !ok {
		t.Fatalf("global provider is %T, want the SDK's", otel.GetTracerProvider())
	}
	_, span := tracing.Tracer().Start(context.Background(), "probe")
	span.End()
	if err := shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(names) != 1 || names[0] != "probe" || svc != "mlx-serving-test" {
		t.Fatalf("collector got spans %v from service %q, want [probe] from mlx-serving-test", names, svc)
	}
}

func TestContextCrossesHeadersAndTraceparent(t *testing.T) {
	resetGlobals(t)
	tp := sdktrace.NewTracerProvider()
	defer func() { _ = tp.Shutdown(context.Background()) }()
	tracing.Install(tp)
	ctx, span := tracing.Tracer().Start(context.Background(), "parent")
	defer span.End()
	want := span.SpanContext()

	h := nats.Header{}
	tracing.InjectHeader(ctx, h)
	got := trace.SpanContextFromContext(tracing.ExtractHeader(context.Background(), h))
	if got.TraceID() != want.TraceID() || got.SpanID() != want.SpanID() || !got.IsRemote() {
		t.Errorf("through nats.Header: got %v, want %v (remote)", got, want)
	}

	tp2 := tracing.Traceparent(ctx)
	got = trace.SpanContextFromContext(tracing.WithTraceparent(context.Background(), tp2))
	if got.TraceID() != want.TraceID() || got.SpanID() != want.SpanID() || !got.IsSampled() {
		t.Errorf("through traceparent %q: got %v, want %v", tp2, got, want)
	}
	for _, bad := range []string{"", "garbage", "00-00000000000000000000000000000000-0000000000000000-01"} {
		if sc := trace.SpanContextFromContext(tracing.WithTraceparent(context.Background(), bad)); sc.IsValid() {
			t.Errorf("traceparent %q gave a valid context %v", bad, sc)
		}
	}

	hh := http.Header{}
	hh.Set("Traceparent", tp2)
	if got := trace.SpanContextFromContext(tracing.ExtractHTTP(context.Background(), hh)); got.TraceID() != want.TraceID() {
		t.Errorf("through http.Header: got %v, want trace %v", got, want.TraceID())
	}
}
