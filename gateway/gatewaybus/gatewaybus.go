// Package gatewaybus puts the gateway on the bus: it gives gateway.Config its
// Jobs (submit and follow a job, cancel it, readiness) and its Fleet (the worker
// registry) over one NATS connection, so that package gateway imports no NATS or
// JetStream package. cmd/mlx-serving builds the gateway with it, and so do tests
// that run one on a real bus.
package gatewaybus

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Options shape the producer and the job streams.
type Options struct {
	// DefaultModel is the producer's model for a job that names none.
	DefaultModel string
	// Stream tunes the job streams (quiet period before RESULTS is consulted, ...).
	Stream bus.StreamOptions
	// Logger receives the producer's logs, as the gateway's component. The zero
	// value discards them.
	Logger zerolog.Logger
}

// Bus is the gateway's side of the bus: it implements gateway.Jobs, and Fleet
// is its gateway.Fleet.
type Bus struct {
	nc       *nats.Conn
	js       jetstream.JetStream
	producer *bus.Client
	stream   bus.StreamOptions
}

// New builds the gateway's side of the bus on the open connection nc.
func New(nc *nats.Conn, o Options) (*Bus, error) {
	if nc == nil {
		return nil, errors.New("gateway: a bus connection is required")
	}
	log := o.Logger.With().Str("component", "gateway").Logger()
	p, err := bus.NewClient(nc, bus.WithDefaultModel(o.DefaultModel), bus.WithClientLogger(log))
	if err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	return &Bus{nc: nc, js: p.JetStream(), producer: p, stream: o.Stream}, nil
}

// Submit opens job's stream and queues the job (bus.SubmitStream). Its errors
// are Submit's own: ErrQueueFull, a *schemas.ValidationError, ...
func (b *Bus) Submit(ctx context.Context, job *schemas.JobRequest) (*bus.JobStream, error) {
	s, _, err := bus.SubmitStream(ctx, b.producer, b.nc, job, b.stream)
	return s, err
}

// Watch opens the stream of tenant's job already submitted (bus.Watch).
func (b *Bus) Watch(ctx context.Context, tenant, jobID, replyTo string) (*bus.JobStream, error) {
	return bus.Watch(ctx, b.nc, b.js, tenant, jobID, replyTo, b.stream)
}

// Cancel asks the fleet to stop tenant's job.
func (b *Bus) Cancel(ctx context.Context, tenant, jobID, reason string) error {
	return b.producer.TenantCancel(ctx, tenant, jobID, reason)
}

// Ended reports whether tenant's job has its terminal record in RESULTS.
func (b *Bus) Ended(ctx context.Context, tenant, jobID string) (bool, error) {
	_, err := b.producer.TenantResult(ctx, tenant, jobID)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, bus.ErrNoResult):
		return false, nil
	}
	return false, err
}

// Ready is nil when jobs can be queued and followed: the connection is up and
// the streams jobs need exist.
func (b *Bus) Ready(ctx context.Context) error {
	if !b.nc.IsConnected() {
		return fmt.Errorf("nats %s", b.nc.Status())
	}
	for _, name := range []string{subjects.StreamJobs, subjects.StreamResults, subjects.StreamCancels} {
		if _, err := b.js.Stream(ctx, name); err != nil {
			return fmt.Errorf("stream %s: %w", name, err)
		}
	}
	return nil
}

// Fleet is the worker registry on the same connection.
func (b *Bus) Fleet() registry.Reader { return registry.NewReader(b.js) }
