package registry

import (
	"context"
	"errors"
	"fmt"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/nats-io/nats.go/jetstream"
)

// AnnounceModels records that models are served now (workers call it; each put
// restarts the model's grace period).
func AnnounceModels(ctx context.Context, kv jetstream.KeyValue, models []string) error {
	var errs []error
	for _, m := range models {
		if _, err := kv.Put(ctx, subjects.ModelKey(m), []byte(m)); err != nil {
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
// must never refuse work it cannot judge. The producer's model check
// (bus.ErrModelNotServed) is built on it.
func ModelServed(ctx context.Context, js jetstream.JetStream, model string) (bool, error) {
	kv, err := js.KeyValue(ctx, subjects.BucketModels)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("bus: models bucket: %w", err)
	}
	e, err := kv.Get(ctx, subjects.ModelKey(model))
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
