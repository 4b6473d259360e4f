package bus

import (
	"errors"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Submit refuses at once a model that no worker serves while others are served,
// queues one whose worker announced it (or did within the grace period), and
// queues anything while no model is served at all: then the fleet is down, and
// jobs wait for it. Mutations caught: dropping the check in Submit (the typo is
// queued); registry.ModelServed answering false on an empty bucket (the outage job is
// refused); an expired announcement still counting (the grace test).
func TestSubmitFailsFastOnAnUnservedModel(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{ModelGrace: time.Second})
	ctx := ctxT(t)
	p := b.client(t, "acme")
	submit := func(id, model string, p *Client) error {
		_, err := p.Submit(ctx, &schemas.JobRequest{ID: id, Model: model, Prompt: "hi"})
		return err
	}

	if err := submit("outage", "tiny", p); err != nil {
		t.Fatalf("nothing served anywhere (an outage): the job must queue, got %v", err)
	}
	kv, err := b.js.KeyValue(ctx, subjects.BucketModels)
	if err != nil {
		t.Fatal(err)
	}
	if err := registry.AnnounceModels(ctx, kv, []string{"tiny", "org/Model-8B:q4"}); err != nil {
		t.Fatal(err)
	}
	if err := submit("served", "org/Model-8B:q4", p); err != nil {
		t.Fatalf("announced model: %v", err)
	}
	err = submit("typo", "tinny", p)
	if !errors.Is(err, ErrModelNotServed) {
		t.Fatalf("unserved model while others are served: got %v, want ErrModelNotServed", err)
	}
	if n := len(jobsInStream(t, b.js)); n != 2 {
		t.Fatalf("JOBS holds %d jobs, want 2 (the refused one not queued)", n)
	}
	loose, _ := NewClient(b.nc, WithTenant("acme"), WithoutModelCheck())
	if err := submit("forced", "tinny", loose); err != nil {
		t.Fatalf("WithoutModelCheck: %v", err)
	}

	// The grace period: once the announcements expire, nothing is served, and
	// the fleet counts as down again (jobs wait).
	deadline := time.Now().Add(10 * time.Second)
	for {
		served, err := registry.ModelServed(ctx, b.js, "never-announced")
		if err != nil {
			t.Fatal(err)
		}
		if served {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("announcements never expired")
		}
		time.Sleep(100 * time.Millisecond) // polling the bucket's TTL, which no event reports
	}
	if served, _ := registry.ModelServed(ctx, b.js, "tiny"); !served {
		t.Fatal("empty bucket must count as an outage")
	}
}

// A models bucket Submit cannot read is ErrModelCheck (the bus is unavailable:
// the gateway answers 503), never an error no sentinel matches (its 500).
// Mutation caught: modelCheck.check returning ModelServed's error unwrapped.
func TestModelCheckFailureIsErrModelCheck(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	nc, js := connectTo(t, b.srv)
	nc.Close()
	var c modelCheck
	if err := c.check(ctxT(t), js, "tiny", time.Now()); !errors.Is(err, ErrModelCheck) {
		t.Fatalf("reading the bucket on a closed connection: got %v, want ErrModelCheck", err)
	}
}
