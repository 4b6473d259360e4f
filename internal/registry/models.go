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
//
// Any message on the model's key counts as served, not only a put of its name:
// no component deletes, purges or rewrites these entries (they expire by the
// bucket's TTL), so a delete or purge marker, or a put of another value, is a
// worker credential tampering — its grant is a publish on the bucket's keys,
// and NATS permissions cannot tell a put from a "KV-Operation: DEL" marker.
// Read through the KV API, such a marker hides the announcement (kv.Get answers
// ErrKeyNotFound) and would make a served model unusable for every tenant for
// as long as it is repeated. Counting it as served gives an attacker nothing:
// the same grant can put any model's name. Keeping history and looking behind
// the marker would not do: producers may only read a key's last message
// (auth's modelReads), and as many markers as the history holds would push the
// put out anyway.
func ModelServed(ctx context.Context, js jetstream.JetStream, model string) (bool, error) {
	s, err := js.Stream(ctx, subjects.ModelsStream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("bus: models bucket: %w", err)
	}
	// The last message on the key, whatever it is (a direct get by subject, the
	// one read producers are granted).
	_, err = s.GetLastMsgForSubject(ctx, subjects.ModelEntry(model))
	if err == nil {
		return true, nil
	}
	if !errors.Is(err, jetstream.ErrMsgNotFound) {
		return false, fmt.Errorf("bus: model %q: %w", model, err)
	}
	// Nothing on the key within the grace period: unknown, unless the bucket is
	// empty (js.Stream has just read its state).
	info := s.CachedInfo()
	if info == nil {
		return false, fmt.Errorf("bus: models bucket: no stream info")
	}
	return info.State.Msgs == 0, nil
}
