package dispatcher

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
)

// floodCancels publishes n cancels on tenant flood's subjects, as a producer
// credential can (core NATS, no validation before the store), body(i) each,
// and waits until CANCELS holds want messages.
func (e *testEnv) floodCancels(n int, body func(i int) []byte, want uint64) {
	e.tb.Helper()
	nc := e.connect("flood")
	for i := range n {
		if err := nc.Publish(subjects.Cancel("flood", fmt.Sprintf("f%d", i)), body(i)); err != nil {
			e.tb.Fatal(err)
		}
		if i%500 == 0 {
			if err := nc.Flush(); err != nil {
				e.tb.Fatal(err)
			}
		}
	}
	if err := nc.Flush(); err != nil {
		e.tb.Fatal(err)
	}
	waitFor(e.tb, 60*time.Second, fmt.Sprintf("%d cancels stored", want), func() bool { return e.streamMsgs(subjects.StreamCancels) == want })
}

// TestCancelBacklogAtTheBound: CANCELS holds nearly as many cancels as its
// bound allows, half of them junk (red-team F2's flood). A dispatcher still
// starts, reads them all before its first pull — junk counted and forgotten,
// real ones remembered —, cancels a queued job, and runs a job to completion.
// Mutation caught: decodeCancel accepting a body that is no cancel
// (BadCancels stays 0 and the junk fills d.cancelled).
func TestCancelBacklogAtTheBound(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	ctx := context.Background()
	prod, err := bus.NewClient(e.nc)
	if err != nil {
		t.Fatal(err)
	}
	early := newJob("early", "m", "normal")
	e.mustSubmit(early)
	if err := prod.Cancel(ctx, "early", "before the flood"); err != nil {
		t.Fatal(err)
	}
	// Room for the cancel below: at the bound CANCELS refuses new ones.
	n := jsprov.DefaultCancelsMaxMsgs - 10
	e.floodCancels(n, func(i int) []byte {
		if i%2 == 1 {
			return []byte("xxxxxxxx")
		}
		return fmt.Appendf(nil, `{"job_id":"f%d","requested_at":"2026-01-01T00:00:00Z"}`, i)
	}, uint64(n+1))

	cfg := testConfig("d1", e.connect("d1"))
	var running <-chan struct{}
	cfg.Logger, running = logSignal(logRunning)
	d, _ := runDispatcher(t, cfg)
	waitClosed(t, running, 60*time.Second, "dispatcher running")
	if got := d.Metrics().BadCancels.Load(); got != int64(n/2) {
		t.Errorf("BadCancels = %d once running, want %d: the junk half of the backlog", got, n/2)
	}
	d.mu.Lock()
	remembered := len(d.cancelled)
	d.mu.Unlock()
	if want := n - n/2 + 1; remembered != want {
		t.Errorf("%d cancels remembered, want %d (the real ones)", remembered, want)
	}

	queued := newJob("queued", "m", "normal")
	c := e.listen(queued.ReplyTo)
	e.mustSubmit(queued)
	if err := prod.Cancel(ctx, "queued", "stop"); err != nil {
		t.Fatal(err)
	}
	if r := c.wait(t, 20*time.Second); r.Status != schemas.StatusCancelled {
		t.Fatalf("queued job cancelled after the flood: %+v", r)
	}
	w := e.startWorker("w1", 2, []string{"m"}, nil)
	if r := e.waitResultAfter(newJob("runs", "m", "normal"), 20*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("job after the flood: %+v", r)
	}
	if r := e.waitResult("early", 20*time.Second); r.Status != schemas.StatusCancelled {
		t.Fatalf("job cancelled before the flood: %+v", r)
	}
	if a, _, _ := w.Snapshot(); len(a) != 1 {
		t.Fatalf("worker ran %v, want only the job that was not cancelled", a)
	}
}

// TestCancelBacklogOfLargeCancels: a stream provisioned before the 8 KiB cap
// may hold cancels of 1 MB. Read 500 a pull, they had the server drop the
// dispatcher as a slow consumer on every reconnect, and it never got going
// (red-team F2). Read in pulls of a few MiB, the connection stays up.
// Mutation caught: Consume without PullMaxBytes (the connection reconnects).
func TestCancelBacklogOfLargeCancels(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{CancelsMaxMsgSize: -1, CancelsMaxBytes: -1})
	big := []byte(strings.Repeat("x", 1_000_000))
	const n = 120 // MB: more than the server buffers for one client (64 MiB)
	e.floodCancels(n, func(int) []byte { return big }, n)

	dc := e.connect("d1")
	reconnects := make(chan struct{}, 1)
	dc.SetReconnectHandler(func(*nats.Conn) { poke(reconnects) })
	cfg := testConfig("d1", dc)
	var running <-chan struct{}
	cfg.Logger, running = logSignal(logRunning)
	d, _ := runDispatcher(t, cfg)
	waitClosed(t, running, 60*time.Second, "dispatcher running")
	e.startWorker("w1", 2, []string{"m"}, nil)
	if r := e.waitResultAfter(newJob("runs", "m", "normal"), 20*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("job after the backlog: %+v", r)
	}
	if got := d.Metrics().BadCancels.Load(); got != n {
		t.Errorf("BadCancels = %d, want %d", got, n)
	}
	select {
	case <-reconnects:
		t.Errorf("the dispatcher's connection was dropped while reading the backlog (%d reconnects)", dc.Stats().Reconnects)
	default:
	}
}

// heldInBacklog builds a dispatcher whose read of the stored cancels stops at
// the first (junk) cancel until the test ends; reading is closed once the
// read is held there.
func heldInBacklog(t *testing.T) (d *Dispatcher, reading chan struct{}) {
	t.Helper()
	e := newEnv(t, jsprov.Options{})
	e.floodCancels(3, func(int) []byte { return []byte("junk") }, 3)
	reading, release := make(chan struct{}), make(chan struct{})
	t.Cleanup(func() { close(release) })
	var once sync.Once
	l := zerolog.New(io.Discard).Hook(zerolog.HookFunc(func(_ *zerolog.Event, _ zerolog.Level, m string) {
		if m == logBadCancel {
			once.Do(func() { close(reading) })
			<-release
		}
	}))
	cfg := testConfig("d1", e.connect("d1"))
	cfg.Logger = &l
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return d, reading
}

// TestCancelBacklogReadStopsWithContext: a dispatcher told to stop while it
// is still reading the stored cancels stops reading and returns (SIGTERM
// during start; the red-team's wedged dispatcher needed SIGKILL). The read is
// held in the middle by the log line of the first junk cancel.
// Mutation caught: watchCancels' loop without its ctx.Done case.
func TestCancelBacklogReadStopsWithContext(t *testing.T) {
	t.Parallel()
	d, reading := heldInBacklog(t)
	if err := d.attach(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		stop, err := d.watchCancels(ctx)
		if stop != nil {
			stop()
		}
		done <- err
	}()
	waitClosed(t, reading, 20*time.Second, "the backlog read under way")
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("watchCancels returned %v, want context.Canceled", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("watchCancels did not return after its context was cancelled")
	}
}

// TestRunStopsWhileReadingCancels: SIGTERM while a dispatcher is still reading
// the stored cancels ends Run (red-team F2: the wedged dispatcher needed
// SIGKILL). The read is held in the middle by the log line of the first junk
// cancel. Mutation caught: Run handing watchCancels d.wctx, which outlives ctx.
func TestRunStopsWhileReadingCancels(t *testing.T) {
	t.Parallel()
	d, reading := heldInBacklog(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	waitClosed(t, reading, 20*time.Second, "the backlog read under way")
	cancel()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return after its context was cancelled during the cancels' backlog")
	}
}
