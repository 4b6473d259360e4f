package gateway

import (
	"context"

	"github.com/mlx-serving/mlx-serving/bus"
	fleetreg "github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Jobs is what the gateway needs of the bus to run jobs. gatewaybus.New
// provides it on a NATS connection; the gateway itself imports no NATS package.
type Jobs interface {
	// Submit opens job's event stream and queues the job. Its errors are the
	// bus's: bus.ErrQueueFull, bus.ErrJobTooLarge, a *schemas.ValidationError, ...
	Submit(ctx context.Context, job *schemas.JobRequest) (*bus.JobStream, error)
	// Watch opens the event stream of tenant's job already submitted (bus.Watch):
	// its first event is the record when it has one.
	Watch(ctx context.Context, tenant, jobID, replyTo string) (*bus.JobStream, error)
	// Cancel asks the fleet to stop tenant's job.
	Cancel(ctx context.Context, tenant, jobID, reason string) error
	// Ended reports whether tenant's job has its terminal record.
	Ended(ctx context.Context, tenant, jobID string) (bool, error)
	// Ready is nil when jobs can be queued now (the bus is connected and the
	// streams jobs need exist), else why not.
	Ready(ctx context.Context) error
}

// Fleet reads the worker registry: every heartbeat now. An error wrapping
// registry.ErrNoRegistry means no worker ever registered (an empty fleet).
// gatewaybus's Fleet provides it.
type Fleet interface {
	// Entries is every heartbeat now, each with the time the server stored
	// it (staleness is judged by that, not the worker's clock).
	Entries(ctx context.Context) ([]fleetreg.Entry, error)
	// ModelServed reports whether a worker announced model within the models
	// bucket's grace period (the one the producers' check uses), or none
	// announced anything at all (an outage: the model is expected back).
	ModelServed(ctx context.Context, model string) (bool, error)
}
