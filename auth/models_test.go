package auth

import (
	"errors"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// With the grants auth init writes, a worker announces the models it serves and
// a producer reads them to fail fast on a model nobody serves — and a producer
// cannot announce a model itself (which would turn the check off for a typo).
// Mutations caught: dropping modelReads from the producer's grants (Submit
// fails with a permission error instead of ErrModelNotServed / success), or
// dropping the worker's put grant (registry.AnnounceModels fails).
func TestModelsBucketGrants(t *testing.T) {
	t.Parallel()
	sb := startSecureBus(t)
	ctx := testenv.Context(t, 60*time.Second)
	w := sb.connect(RoleWorker, "w1")
	kv, err := mustJS(t, w.nc).KeyValue(ctx, subjects.BucketModels)
	if err != nil {
		t.Fatal(err)
	}
	if err := registry.AnnounceModels(ctx, kv, []string{"tiny"}); err != nil {
		t.Fatalf("worker announces: %v", err)
	}
	prod := sb.connect(RoleProducer, "a")
	p, err := bus.NewClient(prod.nc, bus.WithTenant("a"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Submit(ctx, &schemas.JobRequest{Model: "tiny", Prompt: "hi"}); err != nil {
		t.Fatalf("served model: %v", err)
	}
	if _, err := p.Submit(ctx, &schemas.JobRequest{Model: "tiyn", Prompt: "hi"}); !errors.Is(err, bus.ErrModelNotServed) {
		t.Fatalf("unserved model: got %v, want ErrModelNotServed", err)
	}
	if err := prod.nc.Publish("$KV."+subjects.BucketModels+"."+subjects.ModelKey("tiyn"), []byte("tiyn")); err != nil {
		t.Fatal(err)
	}
	prod.violation(t, "Publish", "$KV."+subjects.BucketModels+"."+subjects.ModelKey("tiyn"))
}
