package worker

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// TestAssignmentPushedByAConsumerIsDropped replays the red team's R3-1: an
// assignment written as a value into the registry bucket (as a worker may write
// its own entry) and pushed onto this worker's assign subject by a JetStream
// consumer whose deliver subject names it. The worker must not run it: only a
// message published on its assign subject is an assignment. Mutation: subscribe
// with the bare handler (no onlyOn) and the forged job runs and gets a record.
func TestAssignmentPushedByAConsumerIsDropped(t *testing.T) {
	b := startBus(t, 0)
	cfg := fakeConfig(t, b, "w-pushed", 0)
	startAgent(t, cfg, true)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	forged := newJob("forged through a consumer", 2)
	forgedEvents := collect(t, b.nc, forged.ReplyTo)
	data, err := json.Marshal(batch("tiny", forged))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.kv.Put(ctx, "evil", data); err != nil {
		t.Fatal(err)
	}
	// Our own subscription on the assign subject: the server hands a pushed
	// message to every subscriber at once, so once ours has it, the worker's
	// connection has it too, ahead of anything published after.
	seen, err := b.nc.SubscribeSync(subjects.Assign(cfg.WorkerID))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = seen.Unsubscribe() }()
	_, err = b.js.CreateOrUpdatePushConsumer(ctx, subjects.WorkersStream, jetstream.ConsumerConfig{
		DeliverSubject: subjects.Assign(cfg.WorkerID),
		FilterSubject:  "$KV." + subjects.BucketWorkers + ".evil",
		AckPolicy:      jetstream.AckNonePolicy,
	})
	if err != nil {
		t.Fatal(err)
	}
	if m, err := seen.NextMsg(10 * time.Second); err != nil || m.Subject == subjects.Assign(cfg.WorkerID) {
		t.Fatalf("the consumer's delivery: %v, %v (want it under its stored subject)", m, err)
	}
	// A published assignment after it: the subscription handles messages in
	// order, so once this one has its record the forged one was handled too.
	// It is longer than the forged one, which would have ended first.
	legit := newJob("published assignment", 8)
	events := collect(t, b.nc, legit.ReplyTo)
	if r := assign(t, b.nc, cfg.WorkerID, batch("tiny", legit)); r.Status != schemas.AssignAccepted {
		t.Fatalf("published assignment: %+v", r)
	}
	res := events.untilResult(ctx)
	if res == nil || res.Status != schemas.StatusCompleted {
		t.Fatalf("published job: %+v", res)
	}
	if n := resultsCount(t, b.js, forged.ID); n != 0 {
		t.Fatalf("the pushed assignment ran: %d records for %s", n, forged.ID)
	}
	if n := len(forgedEvents.ch); n != 0 {
		t.Fatalf("the pushed assignment ran: %d events on %s", n, forged.ReplyTo)
	}
}

// relay has the server answer a direct get of a value in the registry bucket
// on subj, as any credential allowed direct gets there can (the red team's
// N1): the answer arrives on subj itself, headers off ("no_hdr"), with no
// reply subject. It returns once the server has sent it (seen on a
// subscription of the caller's own on subj).
func relay(t *testing.T, b *testBus, key string, value []byte, subj string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := b.kv.Put(ctx, key, value); err != nil {
		t.Fatal(err)
	}
	seen, err := b.nc.SubscribeSync(subj)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = seen.Unsubscribe() }()
	get := "$JS.API.DIRECT.GET.KV_" + subjects.BucketWorkers + ".$KV." + subjects.BucketWorkers + "." + key
	if err := b.nc.PublishRequest(get, subj, []byte(`{"no_hdr":true}`)); err != nil {
		t.Fatal(err)
	}
	for {
		m, err := seen.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("the relay never reached %s: %v", subj, err)
		}
		if string(m.Data) == string(value) {
			if m.Reply != "" || len(m.Header) != 0 {
				t.Fatalf("relayed message has reply %q, headers %v", m.Reply, m.Header)
			}
			return
		}
	}
}

// TestRelayedAssignmentAndCancelAreDropped replays the red team's N1 on a
// worker: an assignment, and a cancel of a running job, each written as a
// bucket value and relayed onto the worker's own subjects as a direct get's
// answer. Neither acts: only what a dispatcher published (with a reply
// subject) does. Mutation caught: onlyOn without the subjects.Sent check (the
// relayed assignment runs, the relayed cancel ends the running job).
func TestRelayedAssignmentAndCancelAreDropped(t *testing.T) {
	b := startBus(t, 0)
	cfg := fakeConfig(t, b, "w-relay", 5*time.Millisecond)
	startAgent(t, cfg, true)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// A running job, then a relayed cancel of it.
	long := newJob("runs past the relayed cancel", 200)
	longEvents := collect(t, b.nc, long.ReplyTo)
	if r := assign(t, b.nc, cfg.WorkerID, batch("tiny", long)); r.Status != schemas.AssignAccepted {
		t.Fatalf("assignment: %+v", r)
	}
	if tok, _ := longEvents.next(ctx); tok == nil {
		t.Fatal("the long job sent no token")
	}
	cm, _ := json.Marshal(schemas.CancelMsg{JobID: long.ID, Reason: "relayed", RequestedAt: time.Now().UTC()})
	relay(t, b, "relayed-cancel", cm, subjects.WorkerCancel(cfg.WorkerID))

	// A relayed assignment, then a published one behind it.
	forged := newJob("relayed assignment", 2)
	forgedEvents := collect(t, b.nc, forged.ReplyTo)
	data, _ := json.Marshal(batch("tiny", forged))
	relay(t, b, "relayed-assign", data, subjects.Assign(cfg.WorkerID))
	legit := newJob("published assignment", 8)
	events := collect(t, b.nc, legit.ReplyTo)
	if r := assign(t, b.nc, cfg.WorkerID, batch("tiny", legit)); r.Status != schemas.AssignAccepted {
		t.Fatalf("published assignment: %+v", r)
	}
	if res := events.untilResult(ctx); res == nil || res.Status != schemas.StatusCompleted {
		t.Fatalf("published job: %+v", res)
	}
	if n := resultsCount(t, b.js, forged.ID); n != 0 || len(forgedEvents.ch) != 0 {
		t.Fatalf("the relayed assignment ran: %d records, %d events", n, len(forgedEvents.ch))
	}
	if res := longEvents.untilResult(ctx); res == nil || res.Status != schemas.StatusCompleted {
		t.Fatalf("the long job after a relayed cancel: %+v, want completed", res)
	}
}
