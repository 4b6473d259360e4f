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
	stream := "KV_" + subjects.BucketWorkers
	c, err := b.js.CreateOrUpdatePushConsumer(ctx, stream, jetstream.ConsumerConfig{
		DeliverSubject: subjects.Assign(cfg.WorkerID),
		FilterSubject:  "$KV." + subjects.BucketWorkers + ".evil",
		AckPolicy:      jetstream.AckNonePolicy,
	})
	if err != nil {
		t.Fatal(err)
	}
	// The server pushed it onto the worker's subject (its connection got it).
	for {
		info, err := c.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if info.Delivered.Consumer >= 1 {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal("the consumer never delivered the forged assignment")
		case <-time.After(10 * time.Millisecond):
		}
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
