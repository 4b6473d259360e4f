package worker

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// orderObserver records, in order, slot counts and attempt reports.
type orderObserver struct {
	nopObserver
	mu     sync.Mutex
	events []string
}

func (o *orderObserver) add(ev string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.events = append(o.events, ev)
}

func (o *orderObserver) InFlight(n int)              { o.add(fmt.Sprintf("in_flight=%d", n)) }
func (o *orderObserver) AttemptReported(code string) { o.add("report " + code) }

func (o *orderObserver) reset() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.events = nil
}

// before reports whether a precedes b (both seen).
func (o *orderObserver) before(a, b string) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	ia, ib := slices.Index(o.events, a), slices.Index(o.events, b)
	return ia >= 0 && ib >= 0 && ia < ib
}

// TestSlotFreeBeforeEndIsVisible: a job's slot is given back before its end can
// be seen (the RESULTS record, the attempt report), so a dispatcher that hands
// the slot out again on seeing the end never finds the worker full; and the end
// is stamped no later than the slot came free.
func TestSlotFreeBeforeEndIsVisible(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	cfg := fakeConfig(t, b, "w-slots", 5*time.Millisecond)
	cfg.Slots = 1
	obs := &orderObserver{}
	cfg.Observer = obs
	a := startAgentWith(t, cfg, true, func(a *Agent) {
		a.handOver = func(ctx context.Context, subject string, data []byte) ([]byte, error) {
			var res schemas.ResultMsg
			_ = json.Unmarshal(data, &res)
			obs.add("record " + res.JobID)
			return a.handOverRequest(ctx, subject, data)
		}
	})
	ctx := within(t, 60*time.Second)

	obs.reset()
	// A completed job: the slot is free before the record is written.
	done := newJob("short", 3)
	c := collect(t, b.nc, done.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", done)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	started := time.Now().UTC()
	if r := c.untilResult(ctx); r.Status != schemas.StatusCompleted || r.FinishedAt.Before(started) {
		t.Fatalf("result %+v", r)
	}
	if !obs.before("in_flight=0", "record "+done.ID) {
		t.Fatalf("the slot came free after the result was recorded: %v", obs.events)
	}

	// An attempt that ends with a report (the worker stops mid-job): the slot is
	// free before the report goes out.
	long := newJob("long", 30000)
	cl := collect(t, b.nc, long.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", long)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	if tok, _ := cl.next(ctx); tok == nil {
		t.Fatal("no token")
	}
	obs.reset()
	if err := a.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if !obs.before("in_flight=0", "report "+schemas.CodeWorkerShutdown) {
		t.Fatalf("the slot came free after the attempt report: %v", obs.events)
	}
}

// TestFullWorkerHeartbeatsWhenASlotFrees: dispatchers that did not hold the
// finished job learn of the free slot from the registry soon, not a heartbeat
// interval later (here an hour).
func TestFullWorkerHeartbeatsWhenASlotFrees(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	cfg := fakeConfig(t, b, "w-room", 5*time.Millisecond)
	cfg.Slots = 2
	cfg.HeartbeatInterval = time.Hour
	a := startAgent(t, cfg, true)
	ctx := within(t, 60*time.Second)

	short, long := newJob("short", 2), newJob("long", 30000)
	c := collect(t, b.nc, short.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", short, long)); rep.Status != schemas.AssignAccepted || rep.FreeSlots != 0 {
		t.Fatalf("%+v", rep)
	}
	waitHeartbeat(t, b.kv, a.ID(), 30*time.Second, func(h *schemas.HeartbeatMsg) bool { return h.InFlight == 2 })
	if r := c.untilResult(ctx); r.Status != schemas.StatusCompleted {
		t.Fatalf("%+v", r)
	}
	// Still busy (the long job runs), so no lifecycle change puts an entry.
	waitHeartbeat(t, b.kv, a.ID(), 30*time.Second, func(h *schemas.HeartbeatMsg) bool { return h.InFlight == 1 })
}

// TestStartedAtIsPerProcess: the heartbeat's started_at names the agent's
// process; a runtime restart inside it keeps it (only a new process is a new
// worker incarnation to dispatchers).
func TestStartedAtIsPerProcess(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, fakeConfig(t, b, "w-inc", 0), true)
	ctx := within(t, 60*time.Second)
	first := a.Heartbeat().StartedAt
	if first.IsZero() {
		t.Fatal("no started_at")
	}
	pid := a.RuntimePID()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for {
		st, changed := a.life.watch()
		if p := a.RuntimePID(); st == StateReady && p != pid && p != 0 {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal("runtime not restarted")
		case <-changed:
		}
	}
	if got := a.Heartbeat().StartedAt; !got.Equal(first) {
		t.Fatalf("started_at %v after a runtime restart, was %v", got, first)
	}
}
