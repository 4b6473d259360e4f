package registry

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jsget"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
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
	found, err := lastOnKey(ctx, js, subjects.ModelEntry(model))
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return true, nil // the bucket went away since js.Stream
	}
	if err != nil {
		return false, fmt.Errorf("bus: model %q: %w", model, err)
	}
	if found {
		return true, nil
	}
	// Nothing on the key within the grace period: unknown, unless the bucket is
	// empty (js.Stream has just read its state).
	info := s.CachedInfo()
	if info == nil {
		return false, fmt.Errorf("bus: models bucket: no stream info")
	}
	return info.State.Msgs == 0, nil
}

// lastOnKey reports whether the models bucket holds a message on subject,
// read with a direct get parsed here rather than by nats.go (red team round
// 17, F3). The stored message's headers are its writer's — any worker
// credential, which may put any header on any models key — and the server
// appends its own (Nats-Stream, Nats-Subject, Nats-Sequence, Nats-Time-Stamp)
// after them. nats.go's GetLastMsgForSubject reads the first value of each, so
// a put with "Nats-Time-Stamp: garbage" or "Nats-Sequence: xyz" made every
// read fail (bus: model check failed for every tenant, the gateway 503), and
// it takes "Status: 404" on an empty value for the server's "no message",
// which made a served model unknown. Nothing a writer stored is read here:
// only whether the answer carries a Nats-Sequence, which the server adds to
// every stored message it returns and never to an answer without one. No
// value of that header, nor the time stamp, is needed (the grace period is
// the bucket's TTL), and none is parsed; the message's own KV-Operation
// header is its writer's too and, as ModelServed says, does not matter. The
// Status of an answer without a sequence is the server's.
func lastOnKey(ctx context.Context, js jetstream.JetStream, subject string) (bool, error) {
	m, err := jsget.DirectMsg(ctx, js, subjects.ModelsStream, subject)
	if err != nil {
		return false, err
	}
	if len(m.Header.Values(jetstream.SequenceHeader)) > 0 {
		return true, nil
	}
	switch status := m.Header.Get("Status"); status {
	case "404":
		return false, nil
	case "":
		return false, fmt.Errorf("direct get on %s: %w", subjects.ModelsStream, jetstream.ErrInvalidJetStreamResponse)
	default:
		return false, fmt.Errorf("direct get on %s: status %s %s", subjects.ModelsStream, status, m.Header.Get("Description"))
	}
}
