package bus_test

// What the examples need besides the SDK: a bus, which the fleet's servers start
// and provision, and a stand-in for the fleet that answers a job.

import (
	"context"
	"encoding/json"
	"os"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// exampleBus starts a throwaway embedded bus, provisioned as `mlx-serving up`
// provisions its own, and returns its URL: it stands in for the NATS servers a
// service connects to (`mlx-serving up`, or the cluster of ops/nats).
func exampleBus(ctx context.Context, syncAlways bool) (url string, stop func(), err error) {
	dir, err := os.MkdirTemp("", "mlx-bus-example-")
	if err != nil {
		return "", nil, err
	}
	srv, err := natsserver.Start(ctx, natsserver.Options{Port: -1, StoreDir: dir, SyncAlways: syncAlways})
	if err != nil {
		os.RemoveAll(dir)
		return "", nil, err
	}
	stop = func() {
		_ = srv.Shutdown(context.Background())
		os.RemoveAll(dir)
	}
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		stop()
		return "", nil, err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err == nil {
		err = jsprov.Provision(ctx, js, jsprov.Options{})
	}
	if err != nil {
		stop()
		return "", nil, err
	}
	return srv.ClientURL(), stop, nil
}

// standInWorker answers the next job the way a worker does: token events on the
// job's reply subject, then the terminal record — RESULTS first, then the event.
func standInWorker(ctx context.Context, nc *nats.Conn, deltas []string) {
	js, err := jetstream.New(nc)
	if err != nil {
		panic(err)
	}
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
