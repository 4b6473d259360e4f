package bus_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A backend service streams a job's tokens as they are generated and gets exactly
// one terminal event, then reads the durable result again by id — as it could
// after a restart. In production the fleet answers; here a few lines stand in for
// the dispatcher and worker (tests/ runs the real ones).
func ExampleSubmitStream() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir, _ := os.MkdirTemp("", "mlx-bus-example-")
	defer os.RemoveAll(dir)
	srv, err := natsserver.Start(ctx, natsserver.Options{Port: -1, StoreDir: dir})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer srv.Shutdown(context.Background())
	nc, _ := bus.Connect(ctx, bus.ConnectOptions{URLs: []string{srv.ClientURL()}})
	defer nc.Close()
	js, _ := jetstream.New(nc)
	if err := jsprov.Provision(ctx, js, jsprov.Options{}); err != nil {
		fmt.Println(err)
		return
	}
	standInWorker(ctx, nc, js, []string{"Queues ", "hold ", "the ", "line."})

	producer, _ := bus.NewProducer(nc, bus.WithTenant("acme"))
	job := &schemas.JobRequest{Model: "tiny", Prompt: "Write a haiku about queues.", MaxTokens: 64}
	stream, _, err := bus.SubmitStream(ctx, producer, nc, job, bus.StreamOptions{})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer stream.Close()
	var text strings.Builder
	for ev, err := range stream.Events(ctx) {
		if err != nil {
			fmt.Println(err)
			return
		}
		if ev.Restarted {
			fmt.Println("(the job moved to another worker; its text continues)")
		}
		if ev.Token != nil {
			text.WriteString(ev.Token.Delta)
		}
		if ev.Result != nil {
			fmt.Printf("%s: %q, %d tokens\n", ev.Result.Status, text.String(), ev.Result.Usage.CompletionTokens)
		}
	}

	// The terminal record is durable: fetch it by id, from any process, any time.
	res, _ := producer.Result(ctx, job.ID)
	fmt.Println("stored:", res.Status, res.Text)

	// Output:
	// completed: "Queues hold the line.", 4 tokens
	// stored: completed Queues hold the line.
}

// standInWorker answers the next job the way a worker does: token events on the
// job's reply subject, then the terminal record — RESULTS first, then the event.
func standInWorker(ctx context.Context, nc *nats.Conn, js jetstream.JetStream, deltas []string) {
	cons, err := js.CreateOrUpdateConsumer(ctx, subjects.StreamJobs, jetstream.ConsumerConfig{Durable: "example"})
	if err != nil {
		panic(err)
	}
	go func() {
		msgs, err := cons.Fetch(1, jetstream.FetchMaxWait(10*time.Second))
		if err != nil {
			return
		}
		for m := range msgs.Messages() {
			var job schemas.JobRequest
			_ = json.Unmarshal(m.Data(), &job)
			text := ""
			for i, d := range deltas {
				ev, _ := json.Marshal(schemas.TokenEventMsg{Type: "token", JobID: job.ID, Attempt: 1, Seq: i, Delta: d, Tokens: i + 1})
				_ = nc.Publish(job.ReplyTo, ev)
				text += d
			}
			res := &schemas.ResultMsg{Type: "result", JobID: job.ID, Attempt: 1, Seq: len(deltas), Status: schemas.StatusCompleted,
				FinishReason: "stop", Text: text, Usage: schemas.Usage{PromptTokens: 7, CompletionTokens: len(deltas), TotalTokens: 7 + len(deltas)},
				Model: job.Model, Tenant: job.Tenant, FinishedAt: time.Now().UTC()}
			if results.Record(ctx, js, res) == nil {
				data, _ := json.Marshal(res)
				_ = nc.Publish(job.ReplyTo, data)
			}
			_ = m.Ack()
		}
	}()
}
