package bus

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/nats-io/nats.go/jetstream"
)

// modelCheck remembers models found served for a short while, so a producer
// submitting many jobs for one model pays the lookup once per interval. Only
// positive answers are kept: a model that appears is seen on the next submit.
type modelCheck struct {
	mu   sync.Mutex
	seen map[string]time.Time
}

const modelCheckFresh = 5 * time.Second

// ErrModelCheck: Submit could not read the models bucket to check the job's
// model (a timeout, a lost connection, a refused read); nothing was queued.
// Retry later, or submit WithoutModelCheck. It says the bus is unavailable,
// not that the request is wrong: the gateway answers it 503, never 500.
var ErrModelCheck = errors.New("bus: model check failed")

func (c *modelCheck) check(ctx context.Context, js jetstream.JetStream, model string, now time.Time) error {
	c.mu.Lock()
	at, ok := c.seen[model]
	c.mu.Unlock()
	if ok && now.Sub(at) < modelCheckFresh {
		return nil
	}
	served, err := registry.ModelServed(ctx, js, model)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrModelCheck, err)
	}
	if !served {
		return fmt.Errorf("%w: %q (no worker has announced it within the model grace period)", ErrModelNotServed, model)
	}
	c.mu.Lock()
	if c.seen == nil {
		c.seen = map[string]time.Time{}
	}
	if len(c.seen) > 1024 {
		clear(c.seen)
	}
	c.seen[model] = now
	c.mu.Unlock()
	return nil
}
