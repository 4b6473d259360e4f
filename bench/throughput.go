package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// ThroughputResult is the dispatcher's ceiling with minimal jobs.
type ThroughputResult struct {
	Jobs       int     `json:"jobs"`
	Workers    int     `json:"workers"`
	Slots      int     `json:"slots_per_worker"`
	Seconds    float64 `json:"seconds"`
	JobsPerS   float64 `json:"jobs_per_s"`
	Errors     int64   `json:"errors"`
	TimedOut   bool    `json:"timed_out,omitempty"`
	PublishedS float64 `json:"publish_seconds"`
}

// dispatchThroughput submits n one-token jobs to the dispatcher process through
// fake workers (internal/fakeworker: the runtime taken out, so the dispatcher's
// own ceiling shows) and times submit → every RESULTS record.
func dispatchThroughput(ctx context.Context, url string, n, workers, slots int, within time.Duration, progress func()) (ThroughputResult, error) {
	r := ThroughputResult{Jobs: n, Workers: workers, Slots: slots}
	const model = "bench-fake"
	var conns []*nats.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	connect := func(name string) (*nats.Conn, error) {
		c, err := bus.Connect(ctx, bus.ConnectOptions{URLs: []string{url}, Name: name})
		if err == nil {
			conns = append(conns, c)
		}
		return c, err
	}
	var fws []*fakeworker.Worker
	defer func() {
		for _, w := range fws {
			w.Stop()
			dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_ = w.Deregister(dctx)
			cancel()
		}
	}()
	for i := range workers {
		id := fmt.Sprintf("bench-fake-%d", i)
		c, err := connect(id)
		if err != nil {
			return r, err
		}
		// One-token jobs, answered at once; heart-beating like a real worker:
		// every second and when a full worker frees a slot.
		w, err := fakeworker.Start(ctx, c, fakeworker.Options{ID: id, Slots: slots, Models: []string{model},
			HeartbeatEvery: time.Second, Quiet: true, Hostname: "bench", HandOverTimeout: 30 * time.Second})
		if err != nil {
			return r, err
		}
		fws = append(fws, w)
	}
	nc, err := connect("bench-throughput")
	if err != nil {
		return r, err
	}
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(4096))
	if err != nil {
		return r, err
	}
	var done atomic.Int64
	all := make(chan struct{})
	sub, err := nc.Subscribe(subjects.ResultsAll, func(*nats.Msg) {
		progress()
		if done.Add(1) == int64(n) {
			close(all)
		}
	})
	if err != nil {
		return r, err
	}
	defer func() { _ = sub.Unsubscribe() }()
	_ = sub.SetPendingLimits(-1, -1)
	if err := nc.Flush(); err != nil {
		return r, err
	}
	// Let the dispatcher see the workers' first heartbeats.
	time.Sleep(500 * time.Millisecond)
	start := time.Now()
	for i := range n {
		job := schemas.JobRequest{ID: fmt.Sprintf("tp%08d-%d", i, start.UnixNano()), Model: model, Prompt: "x", MaxTokens: 1, Priority: "normal"}
		job.Tenant = "bench"
		job.ReplyTo = bus.ReplySubject(job.Tenant, job.ID)
		data, _ := json.Marshal(job)
		if _, err := js.PublishAsync(subjects.Job(job.Tenant, "normal", job.ID), data, jetstream.WithMsgID(job.ID), jetstream.WithStallWait(time.Minute)); err != nil {
			return r, fmt.Errorf("publish: %w", err)
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-ctx.Done():
		return r, ctx.Err()
	}
	r.PublishedS = time.Since(start).Seconds()
	select {
	case <-all:
	case <-time.After(within):
		r.TimedOut = true
	case <-ctx.Done():
		return r, ctx.Err()
	}
	elapsed := time.Since(start)
	r.Seconds = elapsed.Seconds()
	r.JobsPerS = float64(done.Load()) / elapsed.Seconds()
	for _, w := range fws {
		r.Errors += w.Errors()
	}
	return r, nil
}
