package registry_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

// A worker credential may publish on every key of the models bucket, and NATS
// permissions cannot tell a put from a delete or purge marker: a marker (or a
// put of another value) on a served model's key must not make it unknown —
// producers would refuse its jobs (model_not_found, exit 7) for every tenant
// for as long as the attacker repeats it. A purge with a rollup header (what
// kv.Purge sends) is refused by the bucket outright. A model nobody wrote
// anything for stays unknown while others are served.
// Mutations caught: ModelServed reading the key through kv.Get (which hides a
// marker as ErrKeyNotFound) fails at the delete marker; ModelServed requiring a
// put's value to be the model's name fails the "another value" case; removing the
// denyRollups call in jsprov.Provision fails the rollup purge.
func TestModelServedSurvivesMarkers(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 30*time.Second)
	kv, err := b.JS.KeyValue(ctx, subjects.BucketModels)
	if err != nil {
		t.Fatal(err)
	}
	if err := registry.AnnounceModels(ctx, kv, []string{"tiny-model", "other-model"}); err != nil {
		t.Fatal(err)
	}
	served := func(model string) bool {
		t.Helper()
		ok, err := registry.ModelServed(ctx, b.JS, model)
		if err != nil {
			t.Fatalf("ModelServed(%q): %v", model, err)
		}
		return ok
	}
	if !served("tiny-model") || served("no-such-model") {
		t.Fatal("before any tampering: tiny-model must be served, no-such-model not")
	}

	// As the attacker does it: a raw publish on the key, acknowledged by the
	// bucket (so it is stored before ModelServed reads).
	attack := func(what string, header nats.Header, data []byte) {
		t.Helper()
		m := nats.NewMsg(subjects.ModelEntry("tiny-model"))
		m.Header, m.Data = header, data
		if _, err := b.JS.PublishMsg(ctx, m); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if !served("tiny-model") {
			t.Fatalf("after %s, tiny-model is no longer served", what)
		}
	}
	attack("a delete marker", nats.Header{"KV-Operation": {"DEL"}}, nil)
	if _, err := kv.Get(ctx, subjects.ModelKey("tiny-model")); err == nil {
		t.Fatal("the delete marker did not hide the entry from kv.Get: the test attacks nothing")
	}
	attack("a purge marker without rollup", nats.Header{"KV-Operation": {"PURGE"}}, nil)
	attack("a put of another value", nil, []byte("not-tiny-model"))

	// kv.Purge adds "Nats-Rollup: sub": the bucket denies rollups.
	if err := kv.Purge(ctx, subjects.ModelKey("other-model")); err == nil {
		t.Fatal("a rollup purge of a model's entry was accepted")
	}
	if !served("other-model") {
		t.Fatal("other-model is no longer served after a refused purge")
	}
	if served("no-such-model") {
		t.Fatal("no-such-model is served: markers on other keys must not count for it")
	}
}

// A worker credential's put on a served model's key may carry headers of its
// own, stored with it; a direct get answers them first and the server's
// (Nats-Sequence, Nats-Time-Stamp) after. Read by nats.go, which takes the
// first value and a Status header on an empty body for the server's own
// answer, "Nats-Time-Stamp: garbage" or "Nats-Sequence: xyz" made every
// producer's model check fail (gateway 503 for every tenant) and an empty
// value with "Status: 404" made the model unknown (red team round 17, F3).
// Mutation caught: ModelServed reading the key with s.GetLastMsgForSubject
// fails each case.
func TestModelServedIgnoresAWritersHeaders(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 30*time.Second)
	kv, err := b.JS.KeyValue(ctx, subjects.BucketModels)
	if err != nil {
		t.Fatal(err)
	}
	if err := registry.AnnounceModels(ctx, kv, []string{"tiny-model", "other-model"}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		what   string
		header nats.Header
		data   []byte
	}{
		{"a put with Nats-Time-Stamp: garbage", nats.Header{"Nats-Time-Stamp": {"garbage"}}, []byte("tiny-model")},
		{"a put with Nats-Sequence: xyz", nats.Header{"Nats-Sequence": {"xyz"}}, []byte("tiny-model")},
		{"an empty put with Status: 404", nats.Header{"Status": {"404"}, "Description": {"No Messages"}}, nil},
		{"an empty put with Status: 503", nats.Header{"Status": {"503"}, "Description": {"No Responders"}}, nil},
		{"an empty delete marker with Status: 404", nats.Header{"KV-Operation": {"DEL"}, "Status": {"404"}}, nil},
	} {
		m := nats.NewMsg(subjects.ModelEntry("tiny-model"))
		for k, v := range c.header {
			m.Header[k] = v
		}
		m.Data = c.data
		// Acknowledged by the bucket: stored before ModelServed reads.
		if _, err := b.JS.PublishMsg(ctx, m); err != nil {
			t.Fatalf("%s: %v", c.what, err)
		}
		ok, err := registry.ModelServed(ctx, b.JS, "tiny-model")
		if err != nil || !ok {
			t.Errorf("after %s: ModelServed(tiny-model) = %v, %v; want served", c.what, ok, err)
		}
		// The attacker's last message on one key changes nothing for another.
		if ok, err := registry.ModelServed(ctx, b.JS, "no-such-model"); err != nil || ok {
			t.Errorf("after %s: ModelServed(no-such-model) = %v, %v; want not served", c.what, ok, err)
		}
	}
}

// An empty bucket (nothing announced within the grace period: the fleet is down)
// serves everything, and a missing one (an older release's bus) too; entries
// removed for real (what the TTL does) leave a model unknown again.
// Mutations caught: ModelServed answering false on an empty bucket, or an
// error on a missing one.
func TestModelServedEmptyOrMissingBucket(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 30*time.Second)
	if ok, err := registry.ModelServed(ctx, b.JS, "tiny-model"); err != nil || !ok {
		t.Fatalf("empty bucket: %v, %v; want served (an outage)", ok, err)
	}
	kv, err := b.JS.KeyValue(ctx, subjects.BucketModels)
	if err != nil {
		t.Fatal(err)
	}
	if err := registry.AnnounceModels(ctx, kv, []string{"other-model", "tiny-model"}); err != nil {
		t.Fatal(err)
	}
	s, err := b.JS.Stream(ctx, subjects.ModelsStream)
	if err != nil {
		t.Fatal(err)
	}
	expire(ctx, t, s, "tiny-model")
	if ok, err := registry.ModelServed(ctx, b.JS, "tiny-model"); err != nil || ok {
		t.Fatalf("entry gone while another model is served: %v, %v; want unknown", ok, err)
	}
	if err := b.JS.DeleteKeyValue(ctx, subjects.BucketModels); err != nil {
		t.Fatal(err)
	}
	if ok, err := registry.ModelServed(ctx, b.JS, "tiny-model"); err != nil || !ok {
		t.Fatalf("no bucket: %v, %v; want served", ok, err)
	}
}

// expire removes model's entry as the bucket's TTL does: the messages go, no
// marker is left.
func expire(ctx context.Context, t *testing.T, s jetstream.Stream, model string) {
	t.Helper()
	if err := s.Purge(ctx, jetstream.WithPurgeSubject("$KV."+subjects.BucketModels+"."+subjects.ModelKey(model))); err != nil {
		t.Fatal(err)
	}
}
