package bus_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go/jetstream"
)

// A backend service with an embedded bus: start the server, provision the streams,
// and submit a job. Against a shared NATS cluster, skip natsserver.Start and pass its
// URLs to Connect.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	dir, err := os.MkdirTemp("", "mlx-bus-example-")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer os.RemoveAll(dir)

	srv, err := natsserver.Start(ctx, natsserver.Options{Port: -1, StoreDir: dir, SyncAlways: true})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer srv.Shutdown(context.Background())

	nc, err := bus.Connect(ctx, bus.ConnectOptions{URLs: []string{srv.ClientURL()}, Name: "example-service"})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer nc.Close()

	js, err := jetstream.New(nc)
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := jsprov.Provision(ctx, js, jsprov.Options{}); err != nil {
		fmt.Println(err)
		return
	}

	producer, err := bus.NewProducer(nc, bus.WithTenant("acme"), bus.WithDefaultModel("mlx-community/tiny"))
	if err != nil {
		fmt.Println(err)
		return
	}
	job := &schemas.JobRequest{ID: "01JEXAMPLE0000000000000000", Prompt: "Write a haiku about queues.", MaxTokens: 64}
	ack, err := producer.Submit(ctx, job)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("queued on", ack.Subject)
	fmt.Println("tokens arrive on", ack.ReplyTo)

	// Submitting the same id again is recognised, not run twice.
	_, err = producer.Submit(ctx, &schemas.JobRequest{ID: job.ID, Prompt: job.Prompt})
	fmt.Println("resubmit is a duplicate:", errors.Is(err, bus.ErrDuplicate))

	// Nothing has run it yet.
	_, err = producer.Result(ctx, job.ID)
	fmt.Println("no result yet:", errors.Is(err, bus.ErrNoResult))

	// Output:
	// queued on mlx.jobs.acme.normal.01JEXAMPLE0000000000000000
	// tokens arrive on mlx.reply.acme.01JEXAMPLE0000000000000000
	// resubmit is a duplicate: true
	// no result yet: true
}
