package dispatcher

import (
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// hearingDispatcher is a dispatcher that does not run, with worker w1 heard
// from at now (a live heartbeat written at created), for tests that drive
// its ticks.
func hearingDispatcher(t *testing.T, created time.Time, live bool) (*Dispatcher, time.Time) {
	t.Helper()
	e := newEnv(t, jsprov.Options{})
	cfg := testConfig("d1", e.connect("d1"))
	cfg.WorkerTTL = time.Second
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	d.mu.Lock()
	d.heartbeat("w1", schemas.HeartbeatMsg{WorkerID: "w1", Models: []string{"m"}, Slots: 4, State: schemas.WorkerReady, StartedAt: now, UpdatedAt: now}, created, live)
	d.mu.Unlock()
	return d, now
}

func lost(d *Dispatcher) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.workers["w1"].lost
}

// ticks runs d's tick every step from from to to.
func ticks(d *Dispatcher, from, to time.Time, step time.Duration) {
	for now := from; !now.After(to); now = now.Add(step) {
		d.tick(now)
	}
}

// A dispatcher whose ticks were held up (the process paused, or starved)
// could not hear heartbeats meanwhile: its workers get a TTL from then, and
// only silence after it makes them lost. Judged by the wall clock, a
// dispatcher SIGSTOPped for 15 s declared every worker lost at once and its
// running jobs were retried (red team round 17, F2).
// Mutation caught: tick without heardAllNow (lost at the first tick after
// the gap).
func TestHeldUpTicksLoseNoWorker(t *testing.T) {
	t.Parallel()
	d, now := hearingDispatcher(t, time.Now(), true)
	d.tick(now)
	after := now.Add(15 * time.Second) // no tick for 15 s
	ticks(d, after, after.Add(800*time.Millisecond), 200*time.Millisecond)
	if lost(d) {
		t.Fatal("a worker was declared lost after the dispatcher's ticks stopped for 15 s")
	}
	ticks(d, after.Add(time.Second), after.Add(1500*time.Millisecond), 100*time.Millisecond)
	if !lost(d) {
		t.Fatal("a worker silent for a TTL of regular ticks after the gap is not lost")
	}
}

// While the dispatcher's connection is down it hears nothing: no worker is
// lost for the time it could not hear (red team round 17, F2: a NATS restart
// of 15 s failed 4 of 8 jobs attempts_exhausted).
// Mutation caught: deafSince without the IsConnected check.
func TestDisconnectedDispatcherLosesNoWorker(t *testing.T) {
	t.Parallel()
	d, now := hearingDispatcher(t, time.Now(), true)
	d.tick(now)
	d.nc.Close()
	ticks(d, now.Add(200*time.Millisecond), now.Add(5*time.Second), 200*time.Millisecond)
	if lost(d) {
		t.Fatal("a worker was declared lost while the dispatcher was disconnected")
	}
}

// A live heartbeat is as fresh as its receipt: a server clock 15 s behind the
// dispatcher's (its store time on the entry) does not make it stale (red team
// round 17, F3: every worker lost at every tick, 8 of 8 slow-prefill jobs
// attempts_exhausted). An entry replayed at start is as old as its write.
// Mutation caught: heartbeat aging a live entry by its store time.
func TestLiveHeartbeatIsFreshWhateverTheServerClock(t *testing.T) {
	t.Parallel()
	skewed := time.Now().Add(-15 * time.Second)
	d, now := hearingDispatcher(t, skewed, true)
	ticks(d, now, now.Add(500*time.Millisecond), 100*time.Millisecond)
	if lost(d) {
		t.Fatal("a live heartbeat stamped 15 s ago by the server's clock made its worker lost")
	}
	d, now = hearingDispatcher(t, skewed, false)
	d.tick(now)
	if !lost(d) {
		t.Fatal("an entry replayed at start, written 15 s ago, counts as fresh")
	}
}

// A replayed entry (the registry watch started again) older than what was
// heard does not move the worker's last hearing back: with the dispatcher's
// clock ahead of the server's, the next tick lost every worker (this
// session's review).
// Mutation caught: heartbeat setting seenAt unconditionally.
func TestReplayedEntryDoesNotAgeAWorker(t *testing.T) {
	t.Parallel()
	d, now := hearingDispatcher(t, time.Now(), true)
	d.mu.Lock()
	hb := d.workers["w1"].hb
	d.heartbeat("w1", hb, now.Add(-15*time.Second), false) // replayed, written 15 s ago
	d.mu.Unlock()
	d.tick(now.Add(100 * time.Millisecond))
	if lost(d) {
		t.Fatal("a replayed older entry made a worker heard just now lost")
	}
}

// frozenPath is a TCP proxy whose forwarding can be held both ways: a frozen
// network path, which delivers nothing and closes nothing.
type frozenPath struct {
	ln     net.Listener
	mu     sync.Mutex
	frozen bool
	thawed *sync.Cond
}

func startFrozenPath(t *testing.T, target string) *frozenPath {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &frozenPath{ln: ln}
	p.thawed = sync.NewCond(&p.mu)
	t.Cleanup(func() { p.freeze(false); _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				_ = c.Close()
				continue
			}
			go p.pipe(s, c)
			go p.pipe(c, s)
		}
	}()
	return p
}

func (p *frozenPath) url() string { return "nats://" + p.ln.Addr().String() }

func (p *frozenPath) freeze(on bool) {
	p.mu.Lock()
	p.frozen = on
	p.mu.Unlock()
	p.thawed.Broadcast()
}

func (p *frozenPath) pipe(dst, src net.Conn) {
	defer dst.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if err != nil {
			return
		}
		p.mu.Lock()
		for p.frozen {
			p.thawed.Wait()
		}
		p.mu.Unlock()
		if _, err := dst.Write(buf[:n]); err != nil {
			return
		}
	}
}

// A dispatcher whose network path froze (connected, hearing nothing) loses
// no worker for it: each tick's probe gets no PONG, and that tick is deaf.
// Before, every worker was declared lost a TTL into the freeze (red team
// round 18, operator F3: 8 of 8 jobs ended attempts_exhausted).
// Mutation caught: deafSince without h.unanswered (w1 lost).
func TestFrozenPathLosesNoWorker(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w1", 2, []string{"m"}, nil)
	path := startFrozenPath(t, strings.TrimPrefix(e.srv.ClientURL(), "nats://"))
	cfg := testConfig("d1", testenv.ConnectWith(t, bus.ConnectOptions{URLs: []string{path.url()}, Name: "d1"}))
	cfg.WorkerTTL = 2 * time.Second // ticks every 333 ms, a probe waits as long: no tick gap over TTL/2
	var running <-chan struct{}
	cfg.Logger, running = logSignal(logRunning)
	d, _ := runDispatcher(t, cfg)
	waitClosed(t, running, 10*time.Second, "dispatcher running")
	heard := func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		w := d.workers["w1"]
		return w != nil && time.Since(w.seenAt) < 500*time.Millisecond
	}
	waitFor(t, 10*time.Second, "w1 heard", heard)
	path.freeze(true)
	time.Sleep(2 * cfg.WorkerTTL) // the freeze itself, not a wait for something
	path.freeze(false)
	waitFor(t, 10*time.Second, "w1 heard again", heard)
	if n := d.Metrics().WorkersLost.Load(); n != 0 {
		t.Fatalf("%d workers declared lost over a frozen path", n)
	}
	if d.Metrics().DeafTicks.Load() == 0 {
		t.Fatal("no deaf tick counted over a frozen path")
	}
}
