package tests

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/dispatcher"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/mlx-serving/mlx-serving/worker"
)

// stack is a real system in one test: embedded NATS, dispatchers, workers with
// their Python runtimes on the tiny model.
type stack struct {
	t    *testing.T
	bus  *testenv.Bus
	prod *bus.Client
}

var workerSeq atomic.Int64

func newStack(t *testing.T) *stack {
	t.Helper()
	return newStackWith(t, natsserver.Options{})
}

// newStackWith is newStack on a server with srv's options (a smaller max
// payload, say).
func newStackWith(t *testing.T, srv natsserver.Options) *stack {
	t.Helper()
	b := testenv.StartBusWith(t, testenv.BusOptions{Server: srv, Provision: jsprov.Options{WorkerTTL: 3 * time.Second}})
	prod, err := bus.NewClient(b.Conn)
	if err != nil {
		t.Fatal(err)
	}
	return &stack{t: t, bus: b, prod: prod}
}

// startDispatcher runs a dispatcher until the test ends and returns its stop func.
func (s *stack) startDispatcher(id string) (stop func()) {
	s.t.Helper()
	return s.startDispatcherOn(id, testenv.Connect(s.t, s.bus.Server.ClientURL()), 0)
}

// startDispatcherOn is startDispatcher on connection nc (closing it is a
// crash: no nak, no answer), with maxAttempts (0: the default).
func (s *stack) startDispatcherOn(id string, nc *nats.Conn, maxAttempts int) (stop func()) {
	s.t.Helper()
	log := testenv.Logger(s.t).With().Str("dispatcher", id).Logger()
	d, err := dispatcher.New(dispatcher.Config{
		DispatcherID: id, Conn: nc, WorkerTTL: 3 * time.Second, AckWait: 6 * time.Second, MaxAttempts: maxAttempts,
		BackoffInitial: 50 * time.Millisecond, BackoffMax: 500 * time.Millisecond, Logger: &log,
	})
	if err != nil {
		s.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = d.Run(ctx) }()
	stop = func() { cancel(); <-done }
	s.t.Cleanup(stop)
	s.waitListening(id)
	return stop
}

// waitListening waits until the server holds dispatcher id's subscriptions for
// its done subject and for new jobs: it is then running (cancels come from the
// CANCELS stream, whose stored backlog it read before subscribing).
func (s *stack) waitListening(id string) {
	s.t.Helper()
	want := []string{subjects.DoneForDispatcher(id), subjects.JobsStored}
	waitFor(s.t, 30*time.Second, func() bool {
		cz, err := s.bus.Server.NATSServer().Connz(&server.ConnzOptions{Subscriptions: true, Limit: 1 << 10})
		if err != nil {
			return false
		}
		for _, c := range cz.Conns {
			if len(c.Subs) > 0 && !slices.ContainsFunc(want, func(w string) bool { return !slices.Contains(c.Subs, w) }) {
				return true
			}
		}
		return false
	})
}

// startWorker runs a worker with the real runtime and waits until it is ready.
func (s *stack) startWorker(slots int) *worker.Agent {
	s.t.Helper()
	nc := testenv.Connect(s.t, s.bus.Server.ClientURL())
	id := fmt.Sprintf("w%d", workerSeq.Add(1))
	a, err := worker.New(worker.Config{
		WorkerID: id, Conn: nc, Python: testenv.Python(s.t),
		Models: []string{"tiny=" + testenv.TinyModel(s.t)}, Slots: slots,
		HeartbeatInterval:     500 * time.Millisecond,
		RestartBackoffInitial: 100 * time.Millisecond,
		Logger:                testenv.Logger(s.t).With().Str("worker", id).Logger(),
	})
	if err != nil {
		s.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = a.Run(ctx) }()
	s.t.Cleanup(func() { cancel(); <-done })
	rctx, rcancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer rcancel()
	if err := a.WaitReady(rctx); err != nil {
		s.t.Fatalf("worker %s not ready: %v", id, err)
	}
	return a
}

// outcome is everything a caller saw of one job.
type outcome struct {
	text      string // concatenated deltas, across attempts
	tokens    int
	attempts  map[int]bool
	restarted bool
	rewound   bool // an attempt started over and the text was rewound
	missed    int
	result    *schemas.ResultMsg
}

// submit sends a job and collects its stream to the terminal event.
func (s *stack) submit(ctx context.Context, job *schemas.JobRequest, onToken func(ev bus.Event)) (*outcome, error) {
	st, _, err := bus.SubmitStream(ctx, s.prod, s.bus.Conn, job, bus.StreamOptions{QuietAfter: time.Second})
	if err != nil {
		return nil, err
	}
	defer st.Close()
	o := &outcome{attempts: map[int]bool{}}
	var b strings.Builder
	for ev, err := range st.Events(ctx) {
		if err != nil {
			return o, err
		}
		o.missed += ev.Missed
		o.restarted = o.restarted || ev.Restarted
		o.rewound = o.rewound || ev.StartedOver
		if ev.Token != nil {
			kept := b.String()[:b.Len()-ev.Drop.Bytes] // a retry's text the caller must take back
			b.Reset()
			b.WriteString(kept)
			o.attempts[ev.Token.Attempt] = true
			o.tokens++
			b.WriteString(ev.Token.Delta)
			if onToken != nil {
				onToken(ev)
			}
		}
		if ev.Result != nil {
			o.result = ev.Result
			o.text = b.String()
			return o, nil
		}
	}
	return o, errors.New("stream ended without a terminal event")
}

func tinyJob(prompt string, maxTokens int) *schemas.JobRequest {
	return &schemas.JobRequest{Model: "tiny", Prompt: prompt, MaxTokens: maxTokens}
}
