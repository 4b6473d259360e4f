package registry_test

import (
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

func TestSnapshotAndGet(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 30*time.Second)

	if hbs, err := registry.Snapshot(ctx, b.JS); err != nil || len(hbs) != 0 {
		t.Fatalf("empty registry: %v, %v", hbs, err)
	}
	kv, err := b.JS.KeyValue(ctx, subjects.BucketWorkers)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"w-b", "w-a"} {
		data, _ := json.Marshal(schemas.HeartbeatMsg{WorkerID: id, State: schemas.WorkerReady, Models: []string{"m"}})
		if _, err := kv.Put(ctx, id, data); err != nil {
			t.Fatal(err)
		}
	}
	// Not a heartbeat: skipped, not an error.
	if _, err := kv.Put(ctx, "junk", []byte("not json")); err != nil {
		t.Fatal(err)
	}
	hbs, err := registry.Snapshot(ctx, b.JS)
	if err != nil || len(hbs) != 2 || hbs[0].WorkerID != "w-a" || hbs[1].WorkerID != "w-b" {
		t.Fatalf("Snapshot = %+v, %v; want w-a, w-b", hbs, err)
	}
	if hb, ok, err := registry.Get(ctx, b.JS, "w-a"); err != nil || !ok || hb.WorkerID != "w-a" {
		t.Fatalf("Get(w-a) = %+v, %v, %v", hb, ok, err)
	}
	if err := registry.Delete(ctx, b.JS, "w-a"); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"w-a", "junk", "never"} {
		if _, ok, err := registry.Get(ctx, b.JS, id); err != nil || ok {
			t.Fatalf("Get(%s) = %v, %v; want absent", id, ok, err)
		}
	}
	if hbs, err := registry.Snapshot(ctx, b.JS); err != nil || len(hbs) != 1 {
		t.Fatalf("after delete: %+v, %v", hbs, err)
	}
}

func TestNoBucket(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 30*time.Second)
	if err := b.JS.DeleteKeyValue(ctx, subjects.BucketWorkers); err != nil {
		t.Fatal(err)
	}
	if _, err := registry.Snapshot(ctx, b.JS); !errors.Is(err, registry.ErrNoRegistry) {
		t.Fatalf("Snapshot without a bucket: %v", err)
	}
	if _, _, err := registry.Get(ctx, b.JS, "w"); !errors.Is(err, registry.ErrNoRegistry) {
		t.Fatalf("Get without a bucket: %v", err)
	}
}
