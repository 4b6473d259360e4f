package registry_test

import (
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

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
	// A heartbeat naming another worker than its key (a worker may write only
	// its own key): skipped, so it cannot stand for that worker.
	other, _ := json.Marshal(schemas.HeartbeatMsg{WorkerID: "w-a", State: schemas.WorkerReady, Models: []string{"evil"}})
	if _, err := kv.Put(ctx, "w-impostor", other); err != nil {
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
	if _, err := registry.Watch(ctx, b.JS, registry.WatchOptions{}); !errors.Is(err, registry.ErrNoRegistry) {
		t.Fatalf("Watch without a bucket: %v", err)
	}
	if _, _, err := registry.Get(ctx, b.JS, "w"); !errors.Is(err, registry.ErrNoRegistry) {
		t.Fatalf("Get without a bucket: %v", err)
	}
}

// Mutation caught (Live): follow marking every entry live, or none.
func TestPutWatchDelete(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 30*time.Second)

	// An entry there before the watch starts is replayed.
	if err := registry.Put(ctx, b.JS, schemas.HeartbeatMsg{WorkerID: "w-a", State: schemas.WorkerReady}); err != nil {
		t.Fatal(err)
	}
	if err := registry.Put(ctx, b.JS, schemas.HeartbeatMsg{}); err == nil {
		t.Fatal("Put without a worker id: want error")
	}
	bad := make(chan string, 1)
	w, err := registry.Watch(ctx, b.JS, registry.WatchOptions{OnBadEntry: func(id string, _ error) { bad <- id }})
	if err != nil {
		t.Fatal(err)
	}
	next := func() registry.Update {
		t.Helper()
		select {
		case u, ok := <-w.Updates():
			if !ok {
				t.Fatal("updates closed")
			}
			return u
		case <-ctx.Done():
			t.Fatal("no update")
		}
		return registry.Update{}
	}
	if u := next(); u.WorkerID != "w-a" || u.Gone || u.Heartbeat.State != schemas.WorkerReady || u.Written.IsZero() || u.Live {
		t.Fatalf("replayed entry: %+v", u)
	}
	reg, err := registry.Open(ctx, b.JS)
	if err != nil {
		t.Fatal(err)
	}
	// Not a heartbeat: skipped and counted; the watch goes on.
	if _, err := b.Workers.Put(ctx, "junk", []byte("not json")); err != nil {
		t.Fatal(err)
	}
	if err := reg.Put(ctx, schemas.HeartbeatMsg{WorkerID: "w-b", Slots: 3}); err != nil {
		t.Fatal(err)
	}
	if u := next(); u.WorkerID != "w-b" || u.Heartbeat.Slots != 3 || !u.Live {
		t.Fatalf("put: %+v", u)
	}
	if id := <-bad; id != "junk" || w.BadEntries() != 1 {
		t.Fatalf("bad entry %q, counted %d", id, w.BadEntries())
	}
	if err := reg.Delete(ctx, "w-a"); err != nil {
		t.Fatal(err)
	}
	if u := next(); u.WorkerID != "w-a" || !u.Gone {
		t.Fatalf("delete: %+v", u)
	}
	w.Stop()
	if _, ok := <-w.Updates(); ok {
		t.Fatal("updates open after Stop")
	}
	if w.Restarts() != 0 {
		t.Fatalf("restarts = %d", w.Restarts())
	}
}

// A watch whose subscription ends while its context is live is opened again
// (here it cannot be: its connection is closed), and Updates stays open until
// the watch is stopped.
func TestWatchRestartsWhenItEnds(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 30*time.Second)
	nc := b.Connect(t, "watcher")
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	restarted := make(chan struct{}, 16)
	w, err := registry.Watch(ctx, js, registry.WatchOptions{OnRestart: func(error) {
		select {
		case restarted <- struct{}{}:
		default:
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	nc.Close()
	for range 2 { // the first restart, then a failed reopening
		select {
		case <-restarted:
		case <-ctx.Done():
			t.Fatal("the watch was not opened again")
		}
	}
	select {
	case _, ok := <-w.Updates():
		if !ok {
			t.Fatal("updates closed while the context is live")
		}
	default:
	}
	w.Stop()
	if _, ok := <-w.Updates(); ok || w.Restarts() < 2 {
		t.Fatalf("after Stop: open %v, restarts %d", ok, w.Restarts())
	}
}

// A worker's put with headers of its own cannot fail the read of the fleet,
// nor set its entry's store time: the server's values are the ones read.
// Before, nats.go read the first Nats-Time-Stamp (the worker's), "garbage"
// failed the get, and the one failed get failed the whole read: the gateway
// answered 503 to every tenant (red team round 16, F2). Mutation caught:
// entry taking the first time stamp (w-future's is a day ahead, w-garbage is
// left out).
func TestEntriesIgnoreAWritersHeaders(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 30*time.Second)
	put := func(id string, hdr nats.Header, data []byte) {
		t.Helper()
		m := &nats.Msg{Subject: subjects.WorkerEntries + id, Header: hdr, Data: data}
		if _, err := b.JS.PublishMsg(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	hb := func(id string) []byte {
		data, _ := json.Marshal(schemas.HeartbeatMsg{WorkerID: id, State: schemas.WorkerReady, Models: []string{"m"}})
		return data
	}
	before := time.Now()
	put("w-honest", nil, hb("w-honest"))
	put("w-garbage", nats.Header{"Nats-Time-Stamp": []string{"garbage"}}, hb("w-garbage"))
	put("w-future", nats.Header{"Nats-Time-Stamp": []string{time.Now().Add(24 * time.Hour).UTC().Format(time.RFC3339Nano)}}, hb("w-future"))
	put("w-status", nats.Header{"Status": []string{"503"}}, nil)
	es, err := registry.Entries(ctx, b.JS)
	if err != nil {
		t.Fatalf("Entries: %v", err)
	}
	got := map[string]time.Time{}
	for _, e := range es {
		got[e.Heartbeat.WorkerID] = e.StoredAt
	}
	for _, id := range []string{"w-honest", "w-garbage", "w-future"} {
		at, ok := got[id]
		if !ok {
			t.Fatalf("%s missing from %v", id, got)
		}
		if at.Before(before.Add(-time.Second)) || at.After(time.Now().Add(time.Second)) {
			t.Fatalf("%s stored at %v, want the server's time (now)", id, at)
		}
	}
	if _, ok := got["w-status"]; ok || len(got) != 3 {
		t.Fatalf("entries %v, want the three heartbeats only", got)
	}
}
