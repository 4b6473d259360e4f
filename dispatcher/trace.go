package dispatcher

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/mlx-serving/mlx-serving/tracing"
)

// startDispatch opens j's "mlx.dispatch" span under the submitter's context. A
// span covers one attempt from pull (or requeue) until a worker accepts it, so
// the time a job waits for a batch or a free worker shows per attempt.
// Callers hold d.mu, or own j before it is registered.
func (d *Dispatcher) startDispatch(j *job) {
	if j.tctx == nil {
		j.tctx = context.Background()
	}
	_, j.span = tracing.Tracer().Start(j.tctx, tracing.SpanDispatch, trace.WithSpanKind(trace.SpanKindConsumer),
		trace.WithAttributes(attribute.String(tracing.AttrJobID, j.id), attribute.String(tracing.AttrModel, j.req.Model)))
}

// dispatchTraceparent stamps j's span with where the attempt goes and returns
// the context the worker's span continues. Callers hold d.mu.
func (d *Dispatcher) dispatchTraceparent(j *job) string {
	if j.span == nil {
		d.startDispatch(j)
	}
	j.span.SetAttributes(attribute.String(tracing.AttrModel, j.req.Model), attribute.Int(tracing.AttrAttempt, j.attempt),
		attribute.String(tracing.AttrWorkerID, j.workerID), attribute.String(tracing.AttrBatchID, j.batchID))
	return tracing.Traceparent(trace.ContextWithSpan(j.tctx, j.span))
}

// endDispatch closes j's span; a non-empty failure marks it as an error.
// Callers hold d.mu.
func (d *Dispatcher) endDispatch(j *job, failure string) {
	if j.span == nil {
		return
	}
	if failure != "" {
		j.span.SetStatus(codes.Error, failure)
	}
	j.span.End()
	j.span = nil
}
