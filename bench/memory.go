package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Memory is what the real processes hold, from /proc/<pid>/status.
type Memory struct {
	// The dispatcher is read with QueuedJobs in JOBS while HeldWorkers fake
	// workers have every one of their Slots busy with jobs that never finish
	// (BusySlots of Slots): it holds work and may pull only what free slots
	// and one batch allow.
	QueuedJobs        int   `json:"queued_jobs"`
	DispatcherRSS     int64 `json:"dispatcher_rss_bytes"`      // the highest VmRSS sampled once saturated
	DispatcherPeakRSS int64 `json:"dispatcher_peak_rss_bytes"` // VmHWM: the process's peak over the whole run
	HeldWorkers       int   `json:"held_workers,omitempty"`
	Slots             int   `json:"held_slots,omitempty"`
	BusySlots         int   `json:"busy_slots,omitempty"`
	// Pulled is what the dispatcher has taken from JOBS and not acked (its
	// consumers' ack-pending, the running jobs included); StillQueued is what
	// it has not taken. PullBound is busy slots plus one batch (MaxBatch):
	// the most it should hold when every slot is full.
	Pulled      int `json:"dispatcher_pulled,omitempty"`
	StillQueued int `json:"still_queued,omitempty"`
	PullBound   int `json:"pull_bound,omitempty"`
	// WorkerRSS is the agent's own process (its runtime is a child with its own
	// pid, so it is not in here), sampled after the bus load at WorkerLoad
	// concurrent requests.
	WorkerRSS     int64 `json:"worker_rss_bytes"`
	WorkerPeakRSS int64 `json:"worker_peak_rss_bytes"`
	WorkerLoad    int   `json:"worker_load_concurrency,omitempty"`
}

// heldModel is served only by the queue phase's fake workers.
const heldModel = "bench-held"

// queueJobs publishes n minimal jobs for model and waits until JetStream has
// stored them.
func queueJobs(ctx context.Context, js jetstream.JetStream, n int, model string, progress func()) error {
	now := time.Now().UnixNano()
	for i := range n {
		job := schemas.JobRequest{ID: fmt.Sprintf("q%08d-%d", i, now), Model: model, Prompt: "x", MaxTokens: 1, Priority: "low"}
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

// queueOptions configure measureQueued.
type queueOptions struct {
	URL           string
	JS            jetstream.JetStream
	DispatcherPID int
	Jobs          int
	Workers       int
	Slots         int // per worker
	BatchMax      int // the dispatcher's batch_max_size
	Progress      func()
}

// measureQueued saturates the dispatcher's workers and queues behind them: fake
// workers (internal/fakeworker) whose jobs never finish take every slot, then
// o.Jobs jobs wait in JOBS. Once every slot is busy it samples the dispatcher's
// RSS for a while and reads what the dispatcher pulled. The workers stop
// (silently) when it returns; the jobs stay behind.
func measureQueued(ctx context.Context, o queueOptions) (*Memory, error) {
	m := &Memory{QueuedJobs: o.Jobs, HeldWorkers: o.Workers, Slots: o.Workers * o.Slots, PullBound: o.Workers*o.Slots + o.BatchMax}
	var fws []*fakeworker.Worker
	defer func() {
		for _, w := range fws {
			w.Stop()
			w.Release() // the held goroutines see a stopped worker and end without a result
			dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_ = w.Deregister(dctx)
			cancel()
			w.Conn().Close()
		}
	}()
	for i := range o.Workers {
		id := fmt.Sprintf("bench-held-%d", i)
		c, err := bus.Connect(ctx, bus.ConnectOptions{URLs: []string{o.URL}, Name: id})
		if err != nil {
			return nil, err
		}
		w, err := fakeworker.Start(ctx, c, fakeworker.Options{ID: id, Slots: o.Slots, Models: []string{heldModel},
			HeartbeatEvery: time.Second, Quiet: true, Hostname: "bench", HandOverTimeout: 5 * time.Second,
			Plan: func(schemas.AssignedJob) fakeworker.Plan { return fakeworker.Plan{Block: true} }})
		if err != nil {
			c.Close()
			return nil, err
		}
		fws = append(fws, w)
	}
	if err := queueJobs(ctx, o.JS, o.Jobs, heldModel, o.Progress); err != nil {
		return nil, err
	}
	busy := func() int {
		n := 0
		for _, w := range fws {
			n += w.InFlight()
		}
		return n
	}
	// Saturation is what the goal is about: wait for it (bounded), and say so
	// when it did not come.
	deadline := time.Now().Add(time.Minute)
	for m.BusySlots = busy(); m.BusySlots < m.Slots && time.Now().Before(deadline); m.BusySlots = busy() {
		if err := sleepCtx(ctx, 100*time.Millisecond); err != nil {
			return nil, err
		}
	}
	// The dispatcher saw a wake-up per job: read it over a few seconds and keep
	// the highest RSS.
	for range 20 {
		cur, peak, err := rss(o.DispatcherPID)
		if err != nil {
			return nil, fmt.Errorf("dispatcher rss: %w", err)
		}
		m.DispatcherRSS, m.DispatcherPeakRSS = max(m.DispatcherRSS, cur), peak
		if err := sleepCtx(ctx, 150*time.Millisecond); err != nil {
			return nil, err
		}
	}
	m.BusySlots = busy()
	var err error
	m.Pulled, m.StillQueued, err = jobsConsumers(ctx, o.JS)
	return m, err
}

// jobsConsumers sums the JOBS consumers' ack-pending (pulled, not acked) and
// pending (not pulled) messages.
func jobsConsumers(ctx context.Context, js jetstream.JetStream) (pulled, waiting int, err error) {
	s, err := js.Stream(ctx, subjects.StreamJobs)
	if err != nil {
		return 0, 0, err
	}
	l := s.ListConsumers(ctx)
	for ci := range l.Info() {
		pulled += ci.NumAckPending
		waiting += int(ci.NumPending) // one consumer per priority: disjoint
	}
	if err := l.Err(); err != nil && !errors.Is(err, nats.ErrTimeout) {
		return pulled, waiting, err
	}
	return pulled, waiting, nil
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}
