package worker

import (
	"context"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/mlx-serving/mlx-serving/tracing"
)

// startGenerate opens the attempt's "mlx.generate" span as a child of the
// dispatcher's span named by the assignment.
func (a *Agent) startGenerate(ctx context.Context, r *jobRun) (context.Context, trace.Span) {
	j := &r.aj.Job
	ctx = tracing.WithTraceparent(ctx, r.aj.Traceparent)
	return tracing.Tracer().Start(ctx, tracing.SpanGenerate, trace.WithSpanKind(trace.SpanKindConsumer),
		trace.WithAttributes(attribute.String(tracing.AttrJobID, j.ID), attribute.Int(tracing.AttrAttempt, r.aj.Attempt),
			attribute.String(tracing.AttrModel, j.Model), attribute.String(tracing.AttrWorkerID, a.cfg.WorkerID)))
}

// traceTimings adds the runtime's own timings as events. The runtime measures
// on its clock from when it took the request; started, just before the call,
// is the closest the worker's clock gets, so first_token is placed from it.
func traceTimings(span trace.Span, started time.Time, gen *schemas.GenerateResult) {
	if gen == nil || !span.IsRecording() {
		return
	}
	t := gen.Timings
	if t.TTFTMs > 0 && !started.IsZero() {
		span.AddEvent(tracing.EventFirstToken, trace.WithTimestamp(started.Add(msDuration(t.TTFTMs))),
			trace.WithAttributes(attribute.Float64(tracing.AttrTTFTMs, t.TTFTMs)))
	}
	span.AddEvent(tracing.EventFinished, trace.WithAttributes(
		attribute.Float64(tracing.AttrTotalMs, t.TotalMs),
		attribute.Float64(tracing.AttrTokensPerSec, t.TokensPerSec),
		attribute.Int(tracing.AttrCompletionTokens, gen.Usage.CompletionTokens),
		attribute.String(tracing.AttrFinishReason, gen.FinishReason)))
}

// traceEnd marks how the attempt ended; a cancel is the caller's choice, not
// an error.
func traceEnd(span trace.Span, status string, info *schemas.ErrorInfo) {
	span.SetAttributes(attribute.String("status", status))
	if info != nil && status != schemas.StatusCancelled {
		span.SetStatus(codes.Error, info.Code+": "+info.Message)
	}
}

func msDuration(ms float64) time.Duration { return time.Duration(ms * float64(time.Millisecond)) }
