// Package tracing carries W3C trace context across the bus and exports spans
// over OTLP/HTTP when an endpoint is configured.
//
// A job's trace runs gateway request → submit (producer) → dispatch (consumer of
// JOBS) → generate (worker). The context travels in the JOBS message's headers
// and, because one assignment carries many jobs, in each assigned job's
// traceparent field. With no endpoint nothing is installed: otel's global
// defaults stay no-op, so instrumented code costs a few allocations per job.
package tracing

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace"
	"go.opentelemetry.io/otel/propagation"
	sdkresource "go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// Span names and attribute keys, shared by every instrumented part so the
// docs and the tests name one thing.
const (
	SpanGatewayRequest = "mlx.gateway.request"
	SpanSubmit         = "mlx.submit"
	SpanDispatch       = "mlx.dispatch"
	SpanGenerate       = "mlx.generate"

	EventFirstToken = "first_token"
	EventFinished   = "finished"

	AttrJobID            = "job_id"
	AttrAttempt          = "attempt"
	AttrModel            = "model"
	AttrWorkerID         = "worker_id"
	AttrBatchID          = "batch_id"
	AttrTTFTMs           = "ttft_ms"
	AttrTotalMs          = "total_ms"
	AttrTokensPerSec     = "tokens_per_s"
	AttrCompletionTokens = "completion_tokens"
	AttrFinishReason     = "finish_reason"
)

// ScopeName is the instrumentation scope of every span this module starts.
const ScopeName = "github.com/mlx-serving/mlx-serving"

// ErrBadEndpoint is matched by Setup's error when Options.Endpoint is not an
// http(s) URL.
var ErrBadEndpoint = errors.New("tracing: endpoint must be an http:// or https:// URL")

// Options configures Setup.
type Options struct {
	// Endpoint is the OTLP/HTTP collector base URL (e.g. http://127.0.0.1:4318);
	// spans go to Endpoint + "/v1/traces". Empty: tracing off.
	Endpoint string
	// ServiceName becomes the service.name resource attribute; default "mlx-serving".
	ServiceName string
	// BatchTimeout bounds how long a finished span waits before export; default
	// the SDK's 5s.
	BatchTimeout time.Duration
}

// Setup installs the global TracerProvider and the W3C TraceContext propagator.
// With an empty endpoint it installs nothing and returns a no-op shutdown: the
// otel defaults (no-op provider, no-op propagator) stay, so nothing is
// propagated or recorded. The returned shutdown flushes pending spans; call it
// once on exit.
func Setup(ctx context.Context, o Options) (shutdown func(context.Context) error, err error) {
	if o.Endpoint == "" {
		return func(context.Context) error { return nil }, nil
	}
	u, err := url.Parse(o.Endpoint)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("%w: %q", ErrBadEndpoint, o.Endpoint)
	}
	exp, err := otlptrace.New(ctx, newOTLPHTTP(strings.TrimSuffix(o.Endpoint, "/")+"/v1/traces"))
	if err != nil {
		return nil, fmt.Errorf("tracing: otlp exporter: %w", err)
	}
	name := o.ServiceName
	if name == "" {
		name = "mlx-serving"
	}
	res := sdkresource.NewSchemaless(attribute.String("service.name", name))
	var bopts []sdktrace.BatchSpanProcessorOption
	if o.BatchTimeout > 0 {
		bopts = append(bopts, sdktrace.WithBatchTimeout(o.BatchTimeout))
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp, bopts...), sdktrace.WithResource(res))
	Install(tp)
	return tp.Shutdown, nil
}

// Install makes tp the global provider and turns on W3C trace context
// propagation; tests use it with an in-memory exporter.
func Install(tp trace.TracerProvider) {
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(propagation.TraceContext{})
}

// Tracer is the module's tracer from the current global provider.
func Tracer() trace.Tracer { return otel.Tracer(ScopeName) }
