package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// fakeWorker answers assignments at once and finishes every job with one token,
// the way the real worker reports (token event, RESULTS record, terminal event),
// and heart-beats like it: every second and whenever it turns full or not full.
// It takes the runtime out, so the dispatcher's own ceiling shows.
type fakeWorker struct {
	id    string
	slots int
	model string
	nc    *nats.Conn
	js    jetstream.JetStream
	kv    jetstream.KeyValue
	sub   *nats.Subscription

	mu       sync.Mutex
	inflight int
	errs     atomic.Int64
	stopHB   chan struct{}
	hbDone   chan struct{}
}

func startFakeWorker(ctx context.Context, nc *nats.Conn, id, model string, slots int) (*fakeWorker, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	kv, err := js.KeyValue(ctx, bus.BucketWorkers)
	if err != nil {
		return nil, err
	}
	w := &fakeWorker{id: id, slots: slots, model: model, nc: nc, js: js, kv: kv, stopHB: make(chan struct{}), hbDone: make(chan struct{})}
	if w.sub, err = nc.Subscribe(bus.AssignSubject(id), w.serve); err != nil {
		return nil, err
	}
	if err := nc.Flush(); err != nil {
		return nil, err
	}
	w.heartbeat()
	go func() {
		defer close(w.hbDone)
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-w.stopHB:
				return
			case <-t.C:
				w.heartbeat()
			}
		}
	}()
	return w, nil
}

func (w *fakeWorker) heartbeat() {
	w.mu.Lock()
	now := time.Now().UTC()
	hb := schemas.HeartbeatMsg{WorkerID: w.id, Hostname: "bench", Platform: "linux", Models: []string{w.model}, Slots: w.slots,
		InFlight: w.inflight, State: schemas.WorkerReady, StartedAt: now, UpdatedAt: now}
	w.mu.Unlock()
	data, _ := json.Marshal(hb)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, _ = w.kv.Put(ctx, w.id, data)
}

func (w *fakeWorker) serve(m *nats.Msg) {
	var a schemas.AssignmentMsg
	if err := json.Unmarshal(m.Data, &a); err != nil {
		w.errs.Add(1)
		return
	}
	w.mu.Lock()
	free := w.slots - w.inflight
	if len(a.Jobs) > free {
		w.mu.Unlock()
		data, _ := json.Marshal(schemas.AssignmentReplyMsg{BatchID: a.BatchID, WorkerID: w.id, Status: schemas.AssignFull, FreeSlots: free})
		_ = m.Respond(data)
		return
	}
	w.inflight += len(a.Jobs)
	free = w.slots - w.inflight
	w.mu.Unlock()
	data, _ := json.Marshal(schemas.AssignmentReplyMsg{BatchID: a.BatchID, WorkerID: w.id, Status: schemas.AssignAccepted, FreeSlots: free})
	_ = m.Respond(data)
	if free == 0 {
		w.heartbeat() // busy
	}
	for _, aj := range a.Jobs {
		go w.run(aj, a.DispatcherID)
	}
}

func (w *fakeWorker) run(aj schemas.AssignedJob, dispatcherID string) {
	job := aj.Job
	ev, _ := json.Marshal(schemas.TokenEventMsg{Type: "token", JobID: job.ID, Attempt: aj.Attempt, Seq: 0, Delta: "x", Tokens: 1})
	_ = w.nc.Publish(job.ReplyTo, ev)
	res := &schemas.ResultMsg{Type: "result", JobID: job.ID, Attempt: aj.Attempt, Seq: 1, Status: schemas.StatusCompleted, FinishReason: "length",
		Text: "x", Usage: schemas.Usage{CompletionTokens: 1, TotalTokens: 1}, Model: job.Model, Tenant: job.Tenant, WorkerID: w.id, FinishedAt: time.Now().UTC()}
	// Like a real worker: the record goes to the dispatcher that placed the job,
	// which stores it, sends the terminal event and acks.
	data, _ := json.Marshal(res)
	m, err := w.nc.Request(bus.DoneSubject(w.id, dispatcherID), data, 30*time.Second)
	var reply schemas.FinishReplyMsg
	if err != nil || json.Unmarshal(m.Data, &reply) != nil || reply.Status != schemas.FinishStored {
		w.errs.Add(1)
	}
	w.mu.Lock()
	wasFull := w.inflight == w.slots
	w.inflight--
	w.mu.Unlock()
	if wasFull {
		w.heartbeat() // ready again
	}
}

func (w *fakeWorker) stop() {
	close(w.stopHB)
	<-w.hbDone
	_ = w.sub.Unsubscribe()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = w.kv.Delete(ctx, w.id)
}

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
// fake workers and times submit → every RESULTS record.
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
	var fws []*fakeWorker
	defer func() {
		for _, w := range fws {
			w.stop()
		}
	}()
	for i := range workers {
		c, err := connect(fmt.Sprintf("bench-fake-%d", i))
		if err != nil {
			return r, err
		}
		w, err := startFakeWorker(ctx, c, fmt.Sprintf("bench-fake-%d", i), model, slots)
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
	sub, err := nc.Subscribe(bus.SubjectResultsAll, func(*nats.Msg) {
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
		if _, err := js.PublishAsync(bus.JobSubject(job.Tenant, "normal", job.ID), data, jetstream.WithMsgID(job.ID), jetstream.WithStallWait(time.Minute)); err != nil {
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
		r.Errors += w.errs.Load()
	}
	return r, nil
}
