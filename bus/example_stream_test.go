package bus_test

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A backend service streams a job's tokens as they are generated and gets exactly
// one terminal event, then reads the durable result again by id — as it could
// after a restart. In production the fleet answers; here a few lines stand in for
// the dispatcher and worker (tests/ runs the real ones).
func ExampleSubmitStream() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	url, stop, err := exampleBus(ctx, false)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer stop()
	nc, _ := bus.Connect(ctx, bus.ConnectOptions{URLs: []string{url}})
	defer nc.Close()
	standInWorker(ctx, nc, []string{"Queues ", "hold ", "the ", "line."})

	client, _ := bus.NewClient(nc, bus.WithTenant("acme"))
	job := &schemas.JobRequest{Model: "tiny", Prompt: "Write a haiku about queues.", MaxTokens: 64}
	stream, _, err := bus.SubmitStream(ctx, client, nc, job, bus.StreamOptions{})
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
		if ev.Drop.Any() {
			// A retry generated other text than this caller was given (rare): take
			// that back. A regenerated prefix is swallowed by the stream itself.
			kept := text.String()[:text.Len()-ev.Drop.Bytes]
			text.Reset()
			text.WriteString(kept)
		}
		if ev.Token != nil {
			text.WriteString(ev.Token.Delta)
		}
		if ev.Result != nil {
			text.WriteString(ev.Rest) // text whose events were lost on the way
			fmt.Printf("%s: %q, %d tokens\n", ev.Result.Status, text.String(), ev.Result.Usage.CompletionTokens)
		}
	}

	// The terminal record is durable: fetch it by id, from any process, any time.
	res, _ := client.Result(ctx, job.ID)
	fmt.Println("stored:", res.Status, res.Text)

	// Output:
	// completed: "Queues hold the line.", 4 tokens
	// stored: completed Queues hold the line.
}
