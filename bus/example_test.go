package bus_test

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A backend service connects to the bus and submits a job. The bus is the
// fleet's NATS (`mlx-serving up`, or the cluster of ops/nats), started and
// provisioned by the servers; here a throwaway local one stands in for it.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	url, stop, err := exampleBus(ctx, true)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer stop()

	nc, err := bus.Connect(ctx, bus.ConnectOptions{URLs: []string{url}, Name: "example-service"})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer nc.Close()

	client, err := bus.NewClient(nc, bus.WithTenant("acme"), bus.WithDefaultModel("mlx-community/tiny"))
	if err != nil {
		fmt.Println(err)
		return
	}
	job := &schemas.JobRequest{ID: "01JEXAMPLE0000000000000000", Prompt: "Write a haiku about queues.", MaxTokens: 64}
	ack, err := client.Submit(ctx, job)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("queued on", ack.Subject)
	fmt.Println("tokens arrive on", ack.ReplyTo)

	// Submitting the same id again is recognised, not run twice.
	_, err = client.Submit(ctx, &schemas.JobRequest{ID: job.ID, Prompt: job.Prompt})
	fmt.Println("resubmit is a duplicate:", errors.Is(err, bus.ErrDuplicate))

	// Nothing has run it yet.
	_, err = client.Result(ctx, job.ID)
	fmt.Println("no result yet:", errors.Is(err, bus.ErrNoResult))

	// Output:
	// queued on mlx.jobs.acme.normal.01JEXAMPLE0000000000000000
	// tokens arrive on mlx.reply.acme.01JEXAMPLE0000000000000000
	// resubmit is a duplicate: true
	// no result yet: true
}
