package gateway

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A model no worker announced is 404 model_not_found, which clients do not retry;
// a model a worker announced within the models bucket's grace period, whose
// workers are away now, is 503 model_not_available, which they retry while it
// comes back — whatever the gateway itself saw (a new gateway knows it too).
// Mutation caught: run() answering modelUnknown with errModelUnavailable fails
// the 404 checks; status() ignoring Fleet.ModelServed fails the 503 one.
func TestUnknownModelIs404AwayModelIs503(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	tb.registerWorker(t, "w1", schemas.WorkerReady, testModel)
	tb.registerWorker(t, "w2", schemas.WorkerReady, "another-model")
	g, srv := newTestGateway(t, tb, nil)
	setRegistry(g, 0) // read the registry at every request

	unknown := map[string]any{"model": "no-such-model"}
	for _, stream := range []bool{false, true} {
		expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(stream, unknown)), http.StatusNotFound, "model", "model_not_found")
		expectError(t, postJSON(t, srv.URL+"/v1/completions", map[string]any{"model": "no-such-model", "prompt": "hi", "stream": stream}),
			http.StatusNotFound, "model", "model_not_found")
	}

	// The worker is gone (its entry expired): its model is away, not unknown.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	kv, err := tb.js.KeyValue(ctx, subjects.BucketWorkers)
	if err != nil {
		t.Fatal(err)
	}
	if err := kv.Delete(ctx, "w1"); err != nil {
		t.Fatal(err)
	}
	expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, nil)), http.StatusServiceUnavailable, "model", "model_not_available")

	// Past the grace period the bucket forgot it (its entry expired) while
	// another model is still served: unknown.
	// (A purge of the key's messages, which is what the TTL does; a delete
	// marker would not do: the bucket counts any message on a key as served,
	// so a worker credential cannot hide a model with one.)
	models, err := tb.js.Stream(ctx, subjects.ModelsStream)
	if err != nil {
		t.Fatal(err)
	}
	if err := models.Purge(ctx, jetstream.WithPurgeSubject("$KV."+subjects.BucketModels+"."+subjects.ModelKey(testModel))); err != nil {
		t.Fatal(err)
	}
	expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, nil)), http.StatusNotFound, "model", "model_not_found")
	if got := value(observed(g).Submitted.WithLabelValues(endpointChat)); got != 0 {
		t.Fatalf("%v jobs were submitted", got)
	}
}

// setRegistry sets the registry's cache ttl.
func setRegistry(g *Gateway, ttl time.Duration) {
	g.registry.mu.Lock()
	defer g.registry.mu.Unlock()
	g.registry.ttl = ttl
}
