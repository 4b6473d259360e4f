package jsprov_test

import (
	"reflect"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

func TestProvisionIsIdempotentAndAppliesChanges(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 20*time.Second)

	configs := func() map[string]jetstream.StreamConfig {
		out := map[string]jetstream.StreamConfig{}
		for _, name := range []string{subjects.StreamJobs, subjects.StreamResults, subjects.StreamDLQ, subjects.StreamCancels, subjects.WorkersStream} {
			s, err := b.JS.Stream(ctx, name)
			if err != nil {
				t.Fatalf("stream %s: %v", name, err)
			}
			out[name] = s.CachedInfo().Config
		}
		return out
	}
	before := configs()

	// The configuration the server holds is the one asked for.
	jobs := before[subjects.StreamJobs]
	if jobs.Retention != jetstream.WorkQueuePolicy || jobs.Discard != jetstream.DiscardNew || jobs.Storage != jetstream.FileStorage ||
		jobs.MaxMsgs != 100_000 || jobs.MaxBytes != 1<<30 || jobs.Duplicates != 2*time.Minute ||
		!reflect.DeepEqual(jobs.Subjects, []string{"mlx.jobs.*.high.*", "mlx.jobs.*.normal.*", "mlx.jobs.*.low.*"}) {
		t.Errorf("JOBS config = %+v", jobs)
	}
	res := before[subjects.StreamResults]
	if res.MaxMsgsPerSubject != 1 || res.Discard != jetstream.DiscardNew || !res.DiscardNewPerSubject || res.MaxAge != 7*24*time.Hour {
		t.Errorf("RESULTS config = %+v", res)
	}
	if c := before[subjects.StreamCancels]; c.MaxMsgsPerSubject != 1 || c.MaxAge != 24*time.Hour {
		t.Errorf("CANCELS config = %+v", c)
	}
	if c := before[subjects.StreamDLQ]; c.MaxAge != 30*24*time.Hour || !reflect.DeepEqual(c.Subjects, []string{"mlx.dlq.>"}) {
		t.Errorf("DLQ config = %+v", c)
	}
	kv, err := b.JS.KeyValue(ctx, subjects.BucketWorkers)
	if err != nil {
		t.Fatalf("bucket: %v", err)
	}
	st, err := kv.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.TTL() != 10*time.Second || st.History() != 1 {
		t.Errorf("bucket TTL %v history %d; want 10s, 1", st.TTL(), st.History())
	}

	// A job queued before re-provisioning must survive it.
	if _, err := b.JS.Publish(ctx, subjects.Job("", "normal", "keep-me"), []byte(`{"id":"keep-me"}`)); err != nil {
		t.Fatal(err)
	}

	// Twice with the same options: no error, nothing changes.
	if err := jsprov.Provision(ctx, b.JS, jsprov.Options{}); err != nil {
		t.Fatalf("second Provision: %v", err)
	}
	if after := configs(); !reflect.DeepEqual(before, after) {
		t.Errorf("second Provision changed configs:\nbefore %+v\nafter  %+v", before, after)
	}

	// A changed limit is applied in place.
	if err := jsprov.Provision(ctx, b.JS, jsprov.Options{JobsMaxMsgs: 5, ResultsMaxAge: time.Hour, WorkerTTL: 3 * time.Second}); err != nil {
		t.Fatalf("Provision with new limits: %v", err)
	}
	after := configs()
	if after[subjects.StreamJobs].MaxMsgs != 5 {
		t.Errorf("JOBS MaxMsgs = %d after update, want 5", after[subjects.StreamJobs].MaxMsgs)
	}
	if after[subjects.StreamResults].MaxAge != time.Hour {
		t.Errorf("RESULTS MaxAge = %v after update, want 1h", after[subjects.StreamResults].MaxAge)
	}
	if st, err := kv.Status(ctx); err != nil || st.TTL() != 3*time.Second {
		t.Errorf("bucket TTL after update: %v, %v; want 3s", st, err)
	}
	if n := b.StreamMsgs(t, subjects.StreamJobs); n != 1 {
		t.Errorf("JOBS has %d messages after updates, want the 1 queued before", n)
	}
}

func TestProvisionReplicasAndStorage(t *testing.T) {
	t.Parallel()
	cfgs := jsprov.StreamConfigs(jsprov.Options{Replicas: 3, Storage: jetstream.MemoryStorage, DuplicateWindow: 48 * time.Hour})
	for name, c := range cfgs {
		if c.Replicas != 3 || c.Storage != jetstream.MemoryStorage {
			t.Errorf("%s: replicas %d storage %v", name, c.Replicas, c.Storage)
		}
		// The server refuses a duplicate window longer than the max age.
		if c.MaxAge > 0 && c.Duplicates > c.MaxAge {
			t.Errorf("%s: duplicate window %v > max age %v", name, c.Duplicates, c.MaxAge)
		}
	}
	if kv := jsprov.WorkersBucketConfig(jsprov.Options{Replicas: 3}); kv.Replicas != 3 || kv.Bucket != subjects.BucketWorkers {
		t.Errorf("bucket config %+v", kv)
	}
	// Three replicas on one server cannot be placed: the server says so.
	b := testenv.StartBus(t, jsprov.Options{})
	if err := jsprov.Provision(testenv.Context(t, 20*time.Second), b.JS, jsprov.Options{Replicas: 3}); err == nil {
		t.Error("Provision with 3 replicas on a single server: want error")
	}
}

// A rollup header on a put to one's own registry key (all a worker's grant
// allows) must not erase other workers' entries.
// Mutation caught: removing the denyRollups call in Provision.
func TestRegistryRefusesRollups(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 20*time.Second)
	kv, err := b.JS.KeyValue(ctx, subjects.BucketWorkers)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"w1", "w2"} {
		if _, err := kv.Put(ctx, k, []byte(`{}`)); err != nil {
			t.Fatal(err)
		}
	}
	m := nats.NewMsg("$KV." + subjects.BucketWorkers + ".w1")
	m.Header.Set("Nats-Rollup", "all")
	if _, err := b.JS.PublishMsg(ctx, m); err == nil {
		t.Fatal("a rollup on the registry was accepted")
	}
	if _, err := kv.Get(ctx, "w2"); err != nil {
		t.Fatalf("w2's entry after a rollup attempt: %v", err)
	}
	if err := kv.Delete(ctx, "w1"); err != nil {
		t.Fatalf("a worker deleting its own entry: %v", err)
	}
	// Provisioning again keeps rollups off.
	if err := jsprov.Provision(ctx, b.JS, jsprov.Options{}); err != nil {
		t.Fatal(err)
	}
	s, err := b.JS.Stream(ctx, subjects.WorkersStream)
	if err != nil || s.CachedInfo().Config.AllowRollup {
		t.Fatalf("rollups allowed after provisioning again (%v)", err)
	}
}

// TestStoredJobWakesWithoutBody: JOBS re-publishes each job it stored on
// subjects.JobStored(priority), headers only: the dispatchers' wake-up names
// the job but never carries its body.
func TestStoredJobWakesWithoutBody(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	sub, err := b.Conn.SubscribeSync(subjects.JobsStored)
	if err != nil {
		t.Fatal(err)
	}
	ctx := testenv.Context(t, 10*time.Second)
	subj := subjects.Job("t1", "low", "j1")
	if _, err := b.JS.Publish(ctx, subj, []byte(`{"secret":"prompt"}`)); err != nil {
		t.Fatal(err)
	}
	m, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatalf("no wake-up: %v", err)
	}
	if m.Subject != subjects.JobStored("low") || len(m.Data) != 0 || m.Header.Get("Nats-Subject") != subj || m.Header.Get("Nats-Sequence") != "1" {
		t.Fatalf("wake-up %s %q %v", m.Subject, m.Data, m.Header)
	}
}
