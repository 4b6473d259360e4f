package dispatcher

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go"
)

// BenchmarkClosedLoop32 is the bus path's closed loop at concurrency 32 in
// small: 32 producers each submit a job, wait for its terminal event and
// submit the next, to one fake worker of 32 slots that heart-beats like the
// real one (every second). Jobs placed together run the same length and end
// together, so their successors arrive as a wave, as a decode batch's finished
// rows do. It reports where a successor waits in the dispatcher: JOBS stored →
// its check starts and → it is queued (P50 and P90, the queuedHook), and
// created_at → the worker has it (dispatch-ms), the worker's finished_at →
// the caller has the terminal event (finished-caller-ms), plus jobs/s and the
// process's CPU per job. The first 64 jobs (the initial wave and its
// successors) are left out of the percentiles.
func BenchmarkClosedLoop32(b *testing.B) {
	for _, always := range []bool{true, false} {
		name := "sync=interval"
		if always {
			name = "sync=always"
		}
		b.Run(name, func(b *testing.B) { benchClosedLoop(b, natsserver.Options{SyncAlways: always}, 32) })
	}
}

func benchClosedLoop(b *testing.B, sopts natsserver.Options, clients int) {
	const tokens, gap = 4, 2 * time.Millisecond
	e := newEnvWith(b, sopts, jsprov.Options{JobsMaxMsgs: 1 << 20})
	w := e.startWorkerWith("w1", clients, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{TokenGap: gap} },
		fakeWorkerOptions{HeartbeatEvery: time.Second, Quiet: true})
	cfg := testConfig("bench", e.connect("bench"))
	cfg.MaxWait = 2 * time.Millisecond
	cfg.AckWait = 30 * time.Second
	cfg.WorkerTTL = 10 * time.Second
	d, err := New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	var hmu sync.Mutex
	var toCheck, toQueue, toCaller []time.Duration
	d.queuedHook = func(stored, checked, queued time.Time) {
		hmu.Lock()
		toCheck = append(toCheck, checked.Sub(stored))
		toQueue = append(toQueue, queued.Sub(stored))
		hmu.Unlock()
	}
	runNew(b, d)

	// One subscription for every reply subject: a job's terminal event closes
	// its channel.
	var waiting sync.Map // job id → chan struct{}
	sub, err := e.nc.Subscribe(subjects.ReplyPrefix+".>", func(m *nats.Msg) {
		if !strings.Contains(string(m.Data), `"type":"result"`) {
			return
		}
		id := m.Subject[strings.LastIndexByte(m.Subject, '.')+1:]
		if ch, ok := waiting.LoadAndDelete(id); ok {
			var r schemas.ResultMsg
			if json.Unmarshal(m.Data, &r) == nil {
				hmu.Lock()
				toCaller = append(toCaller, time.Since(r.FinishedAt))
				hmu.Unlock()
			}
			close(ch.(chan struct{}))
		}
	})
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	_ = e.nc.Flush()

	var next atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	cpu0 := cpuTime()
	start := time.Now()
	for range clients {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(b.N) {
					return
				}
				j := newJob(fmt.Sprintf("c%09d", i), "m", "normal")
				j.MaxTokens = tokens
				now := time.Now()
				j.CreatedAt = &now
				data, _ := json.Marshal(j)
				done := make(chan struct{})
				waiting.Store(j.ID, done)
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				_, err := e.js.Publish(ctx, subjects.Job(j.Tenant, "normal", j.ID), data)
				cancel()
				if err != nil {
					b.Error(err)
					return
				}
				select {
				case <-done:
				case <-time.After(30 * time.Second):
					b.Errorf("no terminal event for %s", j.ID)
					return
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	cpu := cpuTime() - cpu0
	b.StopTimer()

	hmu.Lock()
	defer hmu.Unlock()
	skip := min(2*clients, len(toCheck)/2)
	report := func(ds []time.Duration, name string) {
		ds = slices.Clone(ds[skip:])
		slices.Sort(ds)
		if len(ds) == 0 {
			return
		}
		b.ReportMetric(float64(ds[len(ds)/2].Microseconds())/1000, "p50-"+name+"-ms")
		b.ReportMetric(float64(ds[len(ds)*9/10].Microseconds())/1000, "p90-"+name+"-ms")
	}
	report(toCheck, "stored-check")
	report(toQueue, "stored-queued")
	report(toCaller, "finished-caller")
	lat := w.Stats().Latencies
	if len(lat) > skip {
		lat = slices.Clone(lat[skip:])
		slices.Sort(lat)
		b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-dispatch-ms")
		b.ReportMetric(float64(lat[len(lat)*9/10].Microseconds())/1000, "p90-dispatch-ms")
		var sum time.Duration
		for _, l := range lat {
			sum += l
		}
		b.ReportMetric(float64((sum/time.Duration(len(lat))).Microseconds())/1000, "mean-dispatch-ms")
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "jobs/s")
	// The whole process's CPU per job (server, producers, worker, dispatcher).
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/job")
}
