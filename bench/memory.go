package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Memory is what the real processes hold, from /proc/<pid>/status.
type Memory struct {
	QueuedJobs        int   `json:"queued_jobs"`
	DispatcherRSS     int64 `json:"dispatcher_rss_bytes"`
	DispatcherPeakRSS int64 `json:"dispatcher_peak_rss_bytes"`
	// WorkerRSS is the agent's own process (its runtime is a child with its own
	// pid, so it is not in here), sampled under the concurrency-32 bus load.
	WorkerRSS     int64 `json:"worker_rss_bytes"`
	WorkerPeakRSS int64 `json:"worker_peak_rss_bytes"`
}

// queueJobs publishes n minimal jobs for a model nobody serves while no worker is
// up, so all of them wait in JOBS, and waits until JetStream has stored them.
func queueJobs(ctx context.Context, js jetstream.JetStream, n int, progress func()) error {
	now := time.Now().UnixNano()
	for i := range n {
		job := schemas.JobRequest{ID: fmt.Sprintf("q%08d-%d", i, now), Model: "bench-queued", Prompt: "x", MaxTokens: 1, Priority: "low"}
		job.Tenant = "bench"
		job.ReplyTo = bus.ReplySubject(job.Tenant, job.ID)
		data, _ := json.Marshal(job)
		if _, err := js.PublishAsync(subjects.Job(job.Tenant, "low", job.ID), data, jetstream.WithMsgID(job.ID), jetstream.WithStallWait(time.Minute)); err != nil {
			return fmt.Errorf("publish queued job %d: %w", i, err)
		}
		progress()
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-ctx.Done():
		return ctx.Err()
	}
	s, err := js.Stream(ctx, subjects.StreamJobs)
	if err != nil {
		return err
	}
	info, err := s.Info(ctx)
	if err != nil {
		return err
	}
	if info.State.Msgs < uint64(n) {
		return fmt.Errorf("JOBS holds %d messages, %d published", info.State.Msgs, n)
	}
	return nil
}
