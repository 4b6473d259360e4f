package bus

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// ModelKey is a model's key in BucketModels. Model names may hold characters a
// KV key cannot (spaces, ':', '@'), so the key is a hash of the name.
func ModelKey(model string) string {
	sum := sha256.Sum256([]byte(model))
	return "m" + hex.EncodeToString(sum[:16])
}

// AnnounceModels records that models are served now (workers call it; each put
// restarts the model's grace period).
func AnnounceModels(ctx context.Context, kv jetstream.KeyValue, models []string) error {
	var errs []error
	for _, m := range models {
		if _, err := kv.Put(ctx, ModelKey(m), []byte(m)); err != nil {
			errs = append(errs, fmt.Errorf("announce model %q: %w", m, err))
		}
	}
	return errors.Join(errs...)
}

// ModelServed reports whether a job for model can expect a worker: one served
// it within the grace period, or none served anything (the whole fleet is down
// or not started yet: an outage, and jobs wait in JOBS for it to end, as they
// do at the dispatcher). It is false only when workers are serving other models
// and none has announced this one: a typo or a model nobody deployed. A bus
// without BucketModels (provisioned by an older release) answers true: the check
// must never refuse work it cannot judge.
func ModelServed(ctx context.Context, js jetstream.JetStream, model string) (bool, error) {
	kv, err := js.KeyValue(ctx, BucketModels)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("bus: models bucket: %w", err)
	}
	e, err := kv.Get(ctx, ModelKey(model))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		st, err := kv.Status(ctx)
		if err != nil {
			return false, fmt.Errorf("bus: models bucket: %w", err)
		}
		return st.Values() == 0, nil
	}
	if err != nil {
		return false, fmt.Errorf("bus: model %q: %w", model, err)
	}
	return string(e.Value()) == model, nil
}

// modelCheck remembers models found served for a short while, so a producer
// submitting many jobs for one model pays the lookup once per interval. Only
// positive answers are kept: a model that appears is seen on the next submit.
type modelCheck struct {
	mu   sync.Mutex
	seen map[string]time.Time
}

const modelCheckFresh = 5 * time.Second

func (c *modelCheck) check(ctx context.Context, js jetstream.JetStream, model string, now time.Time) error {
	c.mu.Lock()
	at, ok := c.seen[model]
	c.mu.Unlock()
	if ok && now.Sub(at) < modelCheckFresh {
		return nil
	}
	served, err := ModelServed(ctx, js, model)
	if err != nil {
		return err
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
