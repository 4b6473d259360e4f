package bus

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/mlx-serving/mlx-serving/tracing"
)

// SubmitBatch queues jobs as Submit does each, but together: the checks run
// concurrently, every job is published asynchronously, and the
// acknowledgements are awaited at the end, so a batch costs about one round
// trip (and, with sync_always, rides the server's fsyncs back to back)
// instead of one per job. The publish timeout bounds the whole batch. acks[i]
// and errs[i] are job i's, with Submit's meanings; a job that fails leaves the
// others queued. Defaults are filled in place, as by Submit.
func (p *Client) SubmitBatch(ctx context.Context, jobs []*schemas.JobRequest) (acks []SubmitAck, errs []error) {
	acks, errs = make([]SubmitAck, len(jobs)), make([]error, len(jobs))
	ctx, span := tracing.Tracer().Start(ctx, tracing.SpanSubmit, trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithAttributes(attribute.Int("mlx.jobs", len(jobs))))
	defer func() { endSpan(span, errors.Join(errs...)) }()
	ctx, cancel := p.withTimeout(ctx)
	defer cancel()
	msgs := make([]*nats.Msg, len(jobs))
	var wg sync.WaitGroup
	checks := make(chan struct{}, maxBatchChecks)
	for i, job := range jobs {
		if job == nil {
			errs[i] = errors.New("bus: SubmitBatch: nil job")
			continue
		}
		p.fillDefaults(job)
		fresh := minted.take(job.ID)
		if msgs[i], acks[i], errs[i] = p.prepare(job); errs[i] != nil {
			errs[i] = notSubmitted(errs[i])
			continue
		}
		checks <- struct{}{}
		wg.Go(func() {
			defer func() { <-checks }()
			errs[i] = notSubmitted(p.admit(ctx, job, fresh))
		})
	}
	wg.Wait()
	futures := make([]jetstream.PubAckFuture, len(jobs))
	for i, m := range msgs {
		if errs[i] != nil {
			continue
		}
		// Ended before this job's publish (as Submit checks): nothing of it
		// was sent. Before, a batch with a cancelled context published every
		// job and answered each "context canceled", not ErrNotSubmitted, so
		// the caller took jobs that ran for ones that might not (red team
		// round 22, the bus client's F1).
		if err := ctx.Err(); err != nil {
			errs[i] = notSubmitted(err)
			continue
		}
		tracing.InjectHeader(ctx, m.Header)
		deadline, _ := ctx.Deadline()
		f, err := p.js.PublishMsgAsync(m, jetstream.WithExpectStream(subjects.StreamJobs), jetstream.WithStallWait(max(time.Until(deadline), time.Millisecond)))
		if err != nil {
			// Refused before it was sent (too many publishes awaiting their
			// acks, a closed connection): nothing was stored.
			_, err = p.published(acks[i], nil, err)
			if errors.Is(err, jetstream.ErrTooManyStalledMsgs) && !errors.Is(err, ErrUnavailable) {
				err = fmt.Errorf("%w: %w", ErrUnavailable, err)
			}
			errs[i] = fmt.Errorf("%w: %w", ErrNotSubmitted, err)
			continue
		}
		futures[i] = f
	}
	for i, f := range futures {
		if f == nil {
			continue
		}
		select {
		case pa := <-f.Ok():
			acks[i], errs[i] = p.published(acks[i], pa, nil)
		case err := <-f.Err():
			acks[i], errs[i] = p.published(acks[i], nil, err)
		case <-ctx.Done():
			// Not acknowledged in time: the job may or may not be queued, as
			// for a Submit that timed out.
			acks[i], errs[i] = p.published(acks[i], nil, ctx.Err())
		}
	}
	return acks, errs
}

// maxBatchChecks bounds the concurrent pre-publish checks of one SubmitBatch.
const maxBatchChecks = 64
