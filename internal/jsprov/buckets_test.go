package jsprov_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jserr"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

func streamConfig(ctx context.Context, t *testing.T, js jetstream.JetStream, name string) jetstream.StreamConfig {
	t.Helper()
	s, err := js.Stream(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	return s.CachedInfo().Config
}

// wantBoundedBuckets checks both buckets carry their value-size and byte bounds.
func wantBoundedBuckets(ctx context.Context, t *testing.T, js jetstream.JetStream) {
	t.Helper()
	for _, b := range []struct {
		bucket   string
		maxValue int32
		maxBytes int64
	}{
		{subjects.BucketModels, jsprov.ModelsMaxValueSize, jsprov.DefaultModelsMaxBytes},
		{subjects.BucketWorkers, jsprov.WorkersMaxValueSize, jsprov.DefaultWorkersMaxBytes},
	} {
		c := streamConfig(ctx, t, js, "KV_"+b.bucket)
		if c.MaxMsgSize != b.maxValue || c.MaxBytes != b.maxBytes || c.Discard != jetstream.DiscardNew || c.AllowRollup {
			t.Errorf("%s: max value %d, max bytes %d, discard %v, rollups %v; want %d, %d, new, off",
				b.bucket, c.MaxMsgSize, c.MaxBytes, c.Discard, c.AllowRollup, b.maxValue, b.maxBytes)
		}
	}
}

// longestModel is a model name at job.json's bound (256 characters) of 4-byte
// UTF-8 runes: 1 KiB, the largest value a legitimate announcement has.
func longestModel(tag byte) string {
	return strings.Repeat("𝔪", 255) + string(rune(0x1F600+int(tag)))
}

// TestModelsBucketIsBounded: a worker credential cannot fill the disk through
// BucketModels (red team R3-2): a value larger than a model name can be is
// refused, the longest legitimate name is stored, and past the byte bound a
// new key is refused while a re-announcement of a model already there is
// still stored (discard-new keeps what is stored; on one server a put that
// replaces a value no smaller than itself fits).
// Mutations caught: dropping MaxValueSize from bucketConfig (the oversized value
// is stored); dropping MaxBytes (the flood never stops).
func TestModelsBucketIsBounded(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 30*time.Second)
	wantBoundedBuckets(ctx, t, b.JS)
	kv, err := b.JS.KeyValue(ctx, subjects.BucketModels)
	if err != nil {
		t.Fatal(err)
	}
	served := longestModel(0)
	if len(served) != 1024 {
		t.Fatalf("longest model name is %d bytes, want 1024", len(served))
	}
	if err := registry.AnnounceModels(ctx, kv, []string{served}); err != nil {
		t.Fatalf("announcing the longest legitimate model name: %v", err)
	}
	if _, err := kv.Put(ctx, "junk", bytes.Repeat([]byte("x"), jsprov.ModelsMaxValueSize+1)); !jserr.IsTooLarge(err) {
		t.Fatalf("oversized models value: %v, want too large", err)
	}

	// A small byte bound, then a flood of random keys until it is refused.
	const maxBytes = 64 << 10
	if err := jsprov.Provision(ctx, b.JS, jsprov.Options{ModelsMaxBytes: maxBytes}); err != nil {
		t.Fatal(err)
	}
	// Values of shrinking size, each until refused: the bucket is then full
	// to within a few bytes.
	flooded := 0
	for _, size := range []int{jsprov.ModelsMaxValueSize, 256, 16, 1} {
		junk := bytes.Repeat([]byte("x"), size)
		for {
			if flooded > 10_000 {
				t.Fatalf("%d puts into a %d-byte bucket were all stored", flooded, maxBytes)
			}
			_, err := kv.Put(ctx, fmt.Sprintf("flood-%d", flooded), junk)
			if err != nil {
				if !jserr.IsFull(err) {
					t.Fatalf("flood put %d: %v, want stream full", flooded, err)
				}
				break
			}
			flooded++
		}
	}
	s, err := b.JS.Stream(ctx, subjects.ModelsStream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Bytes > maxBytes {
		t.Fatalf("the bucket holds %d bytes, bound %d", info.State.Bytes, maxBytes)
	}
	// The model announced before the flood is still there and can be
	// announced again; a model never announced cannot be now.
	if err := registry.AnnounceModels(ctx, kv, []string{served}); err != nil {
		t.Errorf("re-announcing a stored model in a full bucket: %v", err)
	}
	if ok, err := registry.ModelServed(ctx, b.JS, served); err != nil || !ok {
		t.Errorf("the model announced before the flood: served %v, %v", ok, err)
	}
	if err := registry.AnnounceModels(ctx, kv, []string{longestModel(1)}); !jserr.IsFull(err) {
		t.Errorf("a new model in a full bucket: %v, want stream full", err)
	}
}

// largestHeartbeat is the largest registry entry a worker builds: every string
// at its schema bound in characters JSON escapes to 6 bytes, 64 models, and
// schemas.MaxHeartbeatPrefixes prefix hashes spread over them.
func largestHeartbeat() schemas.HeartbeatMsg {
	esc := func(n int, tag int) string { return strings.Repeat("<", n-3) + fmt.Sprintf("%03d", tag) }
	hb := schemas.HeartbeatMsg{
		WorkerID: strings.Repeat("w", 64), Hostname: esc(255, 0), Platform: esc(64, 0), Chip: esc(128, 0),
		MemoryBytes: 9007199254740991, Slots: 1024, InFlight: 1024, State: schemas.WorkerReady, Version: esc(64, 0),
		StartedAt: time.Date(2026, 11, 30, 1, 2, 3, 999999999, time.FixedZone("", -12*3600)),
		UpdatedAt: time.Date(2026, 11, 30, 1, 2, 3, 999999999, time.FixedZone("", -12*3600)),
		PromptCache: &schemas.PromptCacheStats{Entries: 1 << 40, Bytes: 1 << 62, MaxBytes: 1 << 62, Lookups: 1 << 62,
			Hits: 1 << 62, HitTokens: 1 << 62, PromptTokens: 1 << 62},
	}
	per := schemas.MaxHeartbeatPrefixes / 64
	for i := range 64 {
		m := esc(256, i)
		hb.Models = append(hb.Models, m)
		p := schemas.ModelPrefixes{Model: m}
		for j := range per {
			p.Hashes = append(p.Hashes, fmt.Sprintf("%016x", i*per+j))
		}
		hb.Prefixes = append(hb.Prefixes, p)
	}
	return hb
}

// TestLargestHeartbeatFits: the worker bucket's value bound leaves room for
// the largest heartbeat a worker builds, which registry.Bucket.Put stores; a
// value past the bound is refused.
// Mutation caught: WorkersMaxValueSize at 128 KiB (the largest heartbeat is
// refused).
func TestLargestHeartbeatFits(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 30*time.Second)
	hb := largestHeartbeat()
	data, err := json.Marshal(hb)
	if err != nil {
		t.Fatal(err)
	}
	if err := schemas.Validate(schemas.Heartbeat, data); err != nil {
		t.Fatalf("the largest heartbeat breaks its schema: %v", err)
	}
	t.Logf("largest heartbeat: %d bytes, bound %d", len(data), jsprov.WorkersMaxValueSize)
	reg, err := registry.Open(ctx, b.JS)
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.Put(ctx, hb); err != nil {
		t.Fatalf("putting the largest heartbeat: %v", err)
	}
	if _, err := b.Workers.Put(ctx, "w2", bytes.Repeat([]byte("x"), jsprov.WorkersMaxValueSize+1)); !jserr.IsTooLarge(err) {
		t.Fatalf("oversized heartbeat: %v, want too large", err)
	}
}

// TestBucketBoundsApplyOnUpgrade: buckets made by an earlier version (no value
// or byte bound) get the bounds when provisioned again, keeping their entries.
// Mutation caught: bucketConfig without MaxValueSize/MaxBytes (the bounds are
// absent after the upgrade).
func TestBucketBoundsApplyOnUpgrade(t *testing.T) {
	t.Parallel()
	js := testenv.StartJetStream(t)
	ctx := testenv.Context(t, 30*time.Second)
	big := bytes.Repeat([]byte("x"), jsprov.WorkersMaxValueSize+1)
	for _, cfg := range []jetstream.KeyValueConfig{
		{Bucket: subjects.BucketModels, History: 1, TTL: jsprov.DefaultModelGrace},
		{Bucket: subjects.BucketWorkers, History: 1, TTL: 10 * time.Second},
	} {
		kv, err := js.CreateKeyValue(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := kv.Put(ctx, "before", big); err != nil {
			t.Fatalf("%s: the old config stores a large value: %v", cfg.Bucket, err)
		}
	}
	if err := jsprov.Provision(ctx, js, jsprov.Options{}); err != nil {
		t.Fatal(err)
	}
	wantBoundedBuckets(ctx, t, js)
	for _, bucket := range []string{subjects.BucketModels, subjects.BucketWorkers} {
		kv, err := js.KeyValue(ctx, bucket)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := kv.Put(ctx, "after", big); !jserr.IsTooLarge(err) {
			t.Errorf("%s: oversized value after the upgrade: %v, want too large", bucket, err)
		}
		if _, err := kv.Get(ctx, "before"); err != nil {
			t.Errorf("%s: the entry stored before the upgrade: %v", bucket, err)
		}
	}
}
