package bus

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
)

func tokenLine(attempt, seq, offset int, delta string) string {
	return fmt.Sprintf(`{"type":"token","job_id":"j","attempt":%d,"seq":%d,"delta":%q,"tokens":%d,"offset":%d}`, attempt, seq, delta, seq+1, offset)
}

func TestJobStreamDropsOffsetOutOfRange(t *testing.T) {
	t.Parallel()
	s := &JobStream{jobID: "j"}
	for _, off := range []int{-1, maxOffset + 1} {
		if _, ok := s.accept([]byte(tokenLine(1, 0, off, "x"))); ok {
			t.Fatalf("offset %d accepted", off)
		}
	}
}

// A terminal event on the reply subject with no record behind it — anyone who
// may publish there (a worker credential streams tokens to every tenant's
// replies) could send one — is not the job's end: the caller gets the stored
// record, whatever the event said.
// Mutation caught: returning the event in Next without s.confirm.
func TestJobStreamHandsOverOnlyTheStoredRecord(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	p := b.client(t, "acme")
	ctx := ctxT(t)
	job := newJob("forged-end", "x")
	stream, ack, err := SubmitStream(ctx, p, b.nc, job, StreamOptions{QuietAfter: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	forged := newResult(ack.JobID, 1, "evil", "forged text")
	forged.Tenant = "acme"
	data, _ := json.Marshal(forged)
	if err := b.nc.Publish(ack.ReplyTo, data); err != nil {
		t.Fatal(err)
	}
	// The real end is stored a moment later (after the forged event's tries).
	real := newResult(ack.JobID, 1, "w1", "real text")
	real.Tenant = "acme"
	go func() {
		time.Sleep(400 * time.Millisecond) // fault injection: the record comes late
		_ = results.Finish(context.Background(), b.js, real, "")
	}()
	ev, err := stream.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ev.Result == nil || ev.Result.Text != "real text" || ev.Result.WorkerID != "w1" {
		t.Fatalf("caller got %+v, want the stored record", ev.Result)
	}
}

// SubmitStream sends no flush of its own for the reply subscription: on the
// client's connection the server handles the SUB before the publish that
// stores the job. A "worker" on another connection answers each job the moment
// JOBS announces it stored, before the producer even has its ack; every first
// event must still reach the stream. (Subscribing after the submit loses some
// of them within a few jobs.)
func TestSubmitStreamMissesNoEventOfAFastWorker(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	worker, _ := connectTo(t, b.srv)
	_, err := worker.Subscribe(subjects.JobsStored, func(m *nats.Msg) {
		ref, _, ok := subjects.ParseJob(m.Header.Get(nats.JSSubject))
		if !ok {
			return
		}
		ev := fmt.Sprintf(`{"type":"token","job_id":%q,"attempt":1,"seq":0,"delta":"x","tokens":1}`, ref.ID)
		_ = worker.Publish(subjects.Reply(ref.Tenant, ref.ID), []byte(ev))
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := worker.Flush(); err != nil {
		t.Fatal(err)
	}
	p := b.client(t, "acme")
	for i := range 100 {
		func() {
			ctx, cancel := context.WithTimeout(ctxT(t), 5*time.Second)
			defer cancel()
			stream, _, err := SubmitStream(ctx, p, b.nc, newJob(fmt.Sprintf("fast-%03d", i), "x"), StreamOptions{QuietAfter: time.Hour})
			if err != nil {
				t.Fatal(err)
			}
			defer stream.Close()
			ev, err := stream.Next(ctx)
			if err != nil || ev.Token == nil || ev.Token.Delta != "x" {
				t.Fatalf("job %d: first event %+v, %v; want the worker's token", i, ev, err)
			}
		}()
	}
}

// A token event pushed onto the reply subject by a JetStream consumer (whose
// deliver subject anyone allowed to create one may choose) keeps the subject
// it was stored under: it was not published on the reply subject and is not
// the job's. The stream skips it and hands over the published event after it.
// Mutation caught: dropping the msg.Subject check in Next.
func TestJobStreamSkipsWhatAConsumerPushed(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	p := b.client(t, "acme")
	ctx := ctxT(t)
	js, err := b.nc.JetStream()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.AddStream(&nats.StreamConfig{Name: "ATK", Subjects: []string{"atk.>"}}); err != nil {
		t.Fatal(err)
	}
	job := newJob("pushed", "x")
	stream, ack, err := SubmitStream(ctx, p, b.nc, job, StreamOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	forged := fmt.Sprintf(`{"type":"token","job_id":%q,"tenant":"acme","attempt":1,"seq":0,"delta":"PUSHED","tokens":1,"offset":0}`, ack.JobID)
	if _, err := js.Publish("atk.x", []byte(forged)); err != nil {
		t.Fatal(err)
	}
	// A subscription of our own on the reply subject, on the stream's
	// connection: once it has the pushed message, so does the stream's.
	seen, err := b.nc.SubscribeSync(ack.ReplyTo)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.AddConsumer("ATK", &nats.ConsumerConfig{DeliverSubject: ack.ReplyTo, AckPolicy: nats.AckNonePolicy}); err != nil {
		t.Fatal(err)
	}
	if m, err := seen.NextMsg(5 * time.Second); err != nil || m.Subject != "atk.x" {
		t.Fatalf("the consumer's delivery: %v, %v", m, err)
	}
	published := fmt.Sprintf(`{"type":"token","job_id":%q,"tenant":"acme","attempt":1,"seq":0,"delta":"published","tokens":1,"offset":0}`, ack.JobID)
	if err := b.nc.Publish(ack.ReplyTo, []byte(published)); err != nil {
		t.Fatal(err)
	}
	ev, err := stream.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ev.Token == nil || ev.Token.Delta != "published" {
		t.Fatalf("first event %+v, want the published token", ev)
	}
}
