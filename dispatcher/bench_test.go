package dispatcher

import (
	"encoding/json"
	"fmt"
	"slices"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// BenchmarkDispatch measures the dispatcher end to end with minimal jobs (one
// token) on two simulated in-process workers of 16 slots: jobs/s from submit to
// RESULTS, dispatch latency (created_at → the worker has the assignment) and
// allocations per job (whole process: embedded server and fake workers too).
// Each runs with the server's fsync setting named in the sub-benchmark:
// sync=always (fsync before every publish ack, the default of `up` and the ops
// configs) and sync=interval (the file store's background fsync).
func BenchmarkDispatch(b *testing.B) { benchSyncs(b, fakeWorkerOptions{}) }

func benchSyncs(b *testing.B, opts fakeWorkerOptions) {
	for _, always := range []bool{true, false} {
		name := "sync=interval"
		if always {
			name = "sync=always"
		}
		b.Run(name, func(b *testing.B) { benchDispatch(b, natsserver.Options{SyncAlways: always}, opts) })
	}
}

// BenchmarkDispatchSlowHeartbeat is BenchmarkDispatch with workers that
// heart-beat like the real one (every second, and rate-limited when a full
// worker frees a slot), not on every accept and finish: the dispatcher must
// learn of free slots from the results.
func BenchmarkDispatchSlowHeartbeat(b *testing.B) {
	benchSyncs(b, fakeWorkerOptions{HeartbeatEvery: time.Second, Quiet: true})
}

func benchDispatch(b *testing.B, sopts natsserver.Options, opts fakeWorkerOptions) {
	e := newEnvWith(b, sopts, jsprov.Options{JobsMaxMsgs: 1 << 20})
	w1 := e.startWorkerWith("w1", 16, []string{"m"}, nil, opts)
	w2 := e.startWorkerWith("w2", 16, []string{"m"}, nil, opts)
	cfg := testConfig("bench", e.connect("bench"))
	cfg.MaxWait = 2 * time.Millisecond
	cfg.AckWait = 30 * time.Second
	cfg.WorkerTTL = 10 * time.Second
	_, _ = runDispatcher(b, cfg)

	var done atomic.Int64
	all := make(chan struct{})
	target := int64(b.N)
	sub, _ := e.nc.Subscribe(subjects.ResultsAll, func(*nats.Msg) {
		if done.Add(1) == target {
			close(all)
		}
	})
	defer sub.Unsubscribe()
	_ = e.nc.Flush()

	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	start := time.Now()
	for i := range b.N {
		j := newJob(fmt.Sprintf("b%09d", i), "m", "normal")
		j.MaxTokens = 1
		now := time.Now()
		j.CreatedAt = &now
		data, _ := json.Marshal(j)
		// The stall wait covers a burst ahead of an fsync-bound store.
		if _, err := e.js.PublishAsync(subjects.Job(j.Tenant, "normal", j.ID), data, jetstream.WithStallWait(time.Minute)); err != nil {
			b.Fatal(err)
		}
	}
	select {
	case <-e.js.PublishAsyncComplete():
	case <-time.After(time.Minute):
		b.Fatal("publish stalled")
	}
	select {
	case <-all:
	case <-time.After(5 * time.Minute):
		b.Fatalf("%d of %d results", done.Load(), b.N)
	}
	elapsed := time.Since(start)
	cpu := cpuTime() - cpu0
	b.StopTimer()

	lat := append(w1.Stats().Latencies, w2.Stats().Latencies...)
	slices.Sort(lat)
	if len(lat) > 0 {
		b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-dispatch-ms")
		b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-dispatch-ms")
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "jobs/s")
	// CPU per job (user+system, the whole process: server, producer, fake
	// workers and dispatcher): what a shared machine's noise moves least.
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/job")
}

// cpuTime is the process's user+system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkDispatchLatencyIdle submits one job at a time to an idle fleet: the
// dispatch latency then is the dispatcher's own (pull, checks, batch window of
// MaxWait=1ms, assignment round trip), not queueing.
func BenchmarkDispatchLatencyIdle(b *testing.B) {
	e := newEnv(b, jsprov.Options{JobsMaxMsgs: 1 << 20})
	w := e.startWorker("w1", 4, []string{"m"}, nil)
	cfg := testConfig("bench", e.connect("bench"))
	cfg.MaxWait = time.Millisecond
	cfg.AckWait = 30 * time.Second
	cfg.WorkerTTL = 10 * time.Second
	_, _ = runDispatcher(b, cfg)
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		j := newJob(fmt.Sprintf("s%09d", i), "m", "normal")
		j.MaxTokens = 1
		c := e.listen(j.ReplyTo)
		now := time.Now()
		j.CreatedAt = &now
		e.mustSubmit(j)
		c.wait(b, 10*time.Second)
	}
	b.StopTimer()
	lat := w.Stats().Latencies
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-dispatch-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-dispatch-ms")
}
