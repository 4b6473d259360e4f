package tracing

import (
	"context"
	"net/http"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
)

// TraceparentKey is the W3C header (and assignment field) that carries a span
// context.
const TraceparentKey = "traceparent"

// HeaderCarrier adapts nats.Header to propagation.TextMapCarrier. NATS header
// keys are case-sensitive; the W3C keys are written and read lower-case, as
// the propagator names them.
type HeaderCarrier nats.Header

var _ propagation.TextMapCarrier = HeaderCarrier{}

// Get returns the first value of key.
func (c HeaderCarrier) Get(key string) string { return nats.Header(c).Get(key) }

// Set replaces key's values with value.
func (c HeaderCarrier) Set(key, value string) { nats.Header(c).Set(key, value) }

// Keys lists the header keys.
func (c HeaderCarrier) Keys() []string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	return keys
}

// InjectHeader writes ctx's span context into h (which must not be nil) with
// the global propagator; it writes nothing when tracing is off.
func InjectHeader(ctx context.Context, h nats.Header) {
	otel.GetTextMapPropagator().Inject(ctx, HeaderCarrier(h))
}

// ExtractHeader returns ctx with the remote span context found in h, if any.
func ExtractHeader(ctx context.Context, h nats.Header) context.Context {
	if len(h) == 0 {
		return ctx
	}
	return otel.GetTextMapPropagator().Extract(ctx, HeaderCarrier(h))
}

// ExtractHTTP returns ctx with the remote span context of an HTTP request's
// headers, if any.
func ExtractHTTP(ctx context.Context, h http.Header) context.Context {
	return otel.GetTextMapPropagator().Extract(ctx, propagation.HeaderCarrier(h))
}

// Traceparent is ctx's span context as one W3C traceparent value, "" when
// there is none or tracing is off. The tracestate is dropped: the assignment
// carries only what links the worker's span to its parent.
func Traceparent(ctx context.Context) string {
	m := propagation.MapCarrier{}
	otel.GetTextMapPropagator().Inject(ctx, m)
	return m[TraceparentKey]
}

// WithTraceparent returns ctx with the remote span context of a traceparent
// value; an empty or malformed value leaves ctx as it is.
func WithTraceparent(ctx context.Context, traceparent string) context.Context {
	if traceparent == "" {
		return ctx
	}
	return otel.GetTextMapPropagator().Extract(ctx, propagation.MapCarrier{TraceparentKey: traceparent})
}
