package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	goruntime "runtime"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// ErrIllegalTransition is returned for an event a lifecycle state does not accept.
var ErrIllegalTransition = errors.New("worker: illegal state transition")

// State is a worker lifecycle state.
type State string

// Worker lifecycle states: starting → ready ⇄ busy → draining → stopped, and
// unavailable whenever the runtime is down (crashed, restarting, breaker open).
const (
	StateStarting    State = "starting"
	StateReady       State = "ready"
	StateBusy        State = "busy"
	StateUnavailable State = "unavailable"
	StateDraining    State = "draining"
	StateStopped     State = "stopped"
)

// Event moves the worker lifecycle.
type Event string

// Lifecycle events.
const (
	EventRuntimeUp   Event = "runtime_up"   // the runtime passed its start checks
	EventRuntimeDown Event = "runtime_down" // the runtime exited, failed health, or the breaker is open
	EventJobsStarted Event = "jobs_started" // in-flight went above zero
	EventJobsIdle    Event = "jobs_idle"    // in-flight went back to zero
	EventDrain       Event = "drain"
	EventStop        Event = "stop"
)

// lifecycleTable is the whole worker lifecycle: state × event → next state. Jobs
// coming and going while unavailable or draining do not change the state; a drain
// is one-way.
var lifecycleTable = map[State]map[Event]State{
	StateStarting: {
		EventRuntimeUp: StateReady, EventRuntimeDown: StateUnavailable,
		EventDrain: StateDraining, EventStop: StateStopped,
	},
	StateReady: {
		EventJobsStarted: StateBusy, EventJobsIdle: StateReady, EventRuntimeUp: StateReady,
		EventRuntimeDown: StateUnavailable, EventDrain: StateDraining, EventStop: StateStopped,
	},
	StateBusy: {
		EventJobsStarted: StateBusy, EventJobsIdle: StateReady, EventRuntimeUp: StateBusy,
		EventRuntimeDown: StateUnavailable, EventDrain: StateDraining, EventStop: StateStopped,
	},
	StateUnavailable: {
		EventRuntimeUp: StateReady, EventRuntimeDown: StateUnavailable,
		EventJobsStarted: StateUnavailable, EventJobsIdle: StateUnavailable,
		EventDrain: StateDraining, EventStop: StateStopped,
	},
	StateDraining: {
		EventRuntimeUp: StateDraining, EventRuntimeDown: StateDraining,
		EventJobsStarted: StateDraining, EventJobsIdle: StateDraining,
		EventDrain: StateDraining, EventStop: StateStopped,
	},
	StateStopped: {},
}

// heartbeatState maps a lifecycle state to what the registry shows: dispatchers
// only need to know whether to send work (capacity is in slots and in_flight).
func heartbeatState(s State) string {
	switch s {
	case StateReady, StateBusy:
		return schemas.WorkerReady
	case StateDraining, StateStopped:
		return schemas.WorkerDraining
	}
	return schemas.WorkerUnavailable
}

// lifecycle holds the worker state and tells the heartbeat loop about changes.
type lifecycle struct {
	mu       sync.Mutex
	state    State
	changed  chan struct{} // closed and replaced on every change
	onChange func(State)   // called with the new state, under mu; may be nil
}

func newLifecycle() *lifecycle {
	return &lifecycle{state: StateStarting, changed: make(chan struct{})}
}

func (l *lifecycle) get() State {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.state
}

// watch returns the current state and a channel closed at the next change.
func (l *lifecycle) watch() (State, <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.state, l.changed
}

func (l *lifecycle) fire(ev Event) (State, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	next, ok := lifecycleTable[l.state][ev]
	if !ok {
		return l.state, fmt.Errorf("%w: worker %s on %s", ErrIllegalTransition, l.state, ev)
	}
	if next != l.state {
		l.state = next
		close(l.changed)
		l.changed = make(chan struct{})
		if l.onChange != nil {
			l.onChange(next)
		}
	}
	return next, nil
}

// hostFacts are read once at start.
type hostFacts struct {
	hostname string
	platform string
	chip     string
}

func readHostFacts() hostFacts {
	h, _ := os.Hostname()
	return hostFacts{hostname: h, platform: goruntime.GOOS + "/" + goruntime.GOARCH, chip: chipName()}
}

func chipName() string {
	switch goruntime.GOOS {
	case "darwin":
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, "sysctl", "-n", "machdep.cpu.brand_string").Output()
		if err == nil {
			return strings.TrimSpace(string(out))
		}
	case "linux":
		b, err := os.ReadFile("/proc/cpuinfo")
		if err == nil {
			for _, line := range strings.Split(string(b), "\n") {
				if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
					return strings.TrimSpace(v)
				}
			}
		}
	}
	return ""
}

// heartbeat builds the registry entry from the agent's current state.
func (a *Agent) heartbeat() schemas.HeartbeatMsg {
	st := a.life.get()
	models, mem := a.sup.loaded()
	if models == nil {
		models = []string{}
	}
	// Stamped after in_flight is read: a job whose end is stamped later than
	// updated_at is counted here (dispatchers rely on it to give slots back).
	inFlight := a.jobs.inFlight()
	cache, prefixes := a.prefixes.summary(a.sup.client())
	return schemas.HeartbeatMsg{
		WorkerID:    a.cfg.WorkerID,
		Hostname:    a.host.hostname,
		Platform:    a.host.platform,
		Chip:        a.host.chip,
		MemoryBytes: mem,
		Models:      models,
		Slots:       a.cfg.Slots,
		InFlight:    inFlight,
		State:       heartbeatState(st),
		Version:     a.cfg.Version,
		StartedAt:   a.startedAt,
		UpdatedAt:   time.Now().UTC(),
		PromptCache: cache,
		Prefixes:    prefixes,
	}
}

// heartbeatLoop puts the registry entry every interval, at once on every
// lifecycle change, and soon when a full worker frees a slot (at most every
// 100 ms or tenth of the interval: a busy worker hovers at full), until ctx
// ends. Beside it, pollPromptCache reads the runtime's prompt-cache stats
// every interval for the entry's routing hints (prefixes.go).
func (a *Agent) heartbeatLoop(ctx context.Context) {
	t := time.NewTicker(a.cfg.HeartbeatInterval)
	defer t.Stop()
	minGap := min(a.cfg.HeartbeatInterval/10, 100*time.Millisecond)
	var last time.Time
	var reg registry.Bucket
	opened := false
	go a.pollPromptCache(ctx, a.cfg.HeartbeatInterval)
	for {
		_, changed := a.life.watch()
		if !opened {
			b, err := registry.Open(ctx, a.js)
			if err != nil && ctx.Err() == nil {
				a.log.Warn().Err(err).Msg("worker registry bucket not available; will retry")
			}
			reg, opened = b, err == nil
		}
		if opened {
			// Announced first: whoever sees the model in a heartbeat finds it
			// announced too, so a producer never refuses a model a ready worker has.
			a.announceModels(ctx)
			if err := a.putHeartbeat(ctx, reg); errors.Is(err, errSuperseded) {
				a.log.Error().Err(err).Msg("this worker process was replaced under its id; stopping without touching the other's entry")
				a.superseded.Store(true)
				go func() { _ = a.Shutdown(context.Background()) }()
				return
			} else if err != nil && ctx.Err() == nil {
				a.log.Warn().Err(err).Msg("heartbeat put failed")
			}
			last = time.Now()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-changed:
		case <-a.room:
			// Dispatchers that hold the freed job see its end; this tells the
			// others. The wait still yields to the tick and to changes.
			if wait := minGap - time.Since(last); wait > 0 {
				w := time.NewTimer(wait)
				select {
				case <-ctx.Done():
				case <-w.C:
				case <-t.C:
				case <-changed:
				}
				w.Stop()
			}
		}
	}
}

// putHeartbeat writes this process's entry, conditional on the revision it
// wrote last: a write refused because the entry changed since is looked at,
// and an entry of another process of this id means this one was replaced (it
// was paused past the TTL, or asleep, and a new process claimed the id
// meanwhile): errSuperseded. Before, both processes heart-beat on, each
// overwriting the other's entry, and every dispatcher that started while the
// old one's entry stood placed jobs on the old process (red team round 17,
// F1). Any other change (the entry expired or was deleted, or this process's
// own write whose answer was lost) is written over, conditional on what was
// read.
func (a *Agent) putHeartbeat(ctx context.Context, reg registry.Bucket) error {
	hb := a.heartbeat()
	pctx, cancel := context.WithTimeout(ctx, a.cfg.HeartbeatInterval+time.Second)
	defer cancel()
	rev, err := reg.PutAt(pctx, hb, a.hbRev)
	if err != nil && a.hbRev != 0 && pctx.Err() == nil {
		// Written over only as read: conditional on the revision read, or a
		// create where there was none. Unconditional, a later process's claim
		// landing between the read and the write was wiped, the race the
		// first heartbeat had (red team round 18, R-L1). An unreadable entry
		// is not written: the next beat reads it again.
		e, gerr := reg.Entry(pctx, a.cfg.WorkerID)
		var read uint64
		switch {
		case errors.Is(gerr, jetstream.ErrKeyNotFound): // expired, deleted, or lost with the store
		case gerr != nil:
			return fmt.Errorf("heartbeat: the entry changed and could not be read: %w", gerr)
		default:
			// Another process's entry, whatever its start time says: the
			// server ordered the writes, and this process's write came after
			// that one's claim or beat. Compared by start times, two hosts'
			// clocks decided which process stayed, and a resumed process on
			// a host whose clock was ahead stopped its live replacement (red
			// team round 18, operator F4).
			var other schemas.HeartbeatMsg
			if json.Unmarshal(e.Value(), &other) != nil || !other.StartedAt.Equal(a.startedAt) || other.Hostname != a.host.hostname {
				return fmt.Errorf("%w: a process of worker id %q started at %s (host %q) wrote its entry after this one's (started %s)",
					errSuperseded, a.cfg.WorkerID, other.StartedAt.Format(time.RFC3339Nano), other.Hostname, a.startedAt.Format(time.RFC3339Nano))
			}
			read = e.Revision()
		}
		if a.beforeRewrite != nil {
			a.beforeRewrite()
		}
		rev, err = reg.Claim(pctx, hb, read)
	}
	if err == nil {
		a.hbRev = rev
	}
	return err
}

// errSuperseded: a process of this worker id that started later writes its
// entry; this one stops (Run returns ErrWorkerIDInUse).
var errSuperseded = fmt.Errorf("%w: replaced by a later process", ErrWorkerIDInUse)

// deleteHeartbeat removes the registry entry on a clean stop, so dispatchers stop
// routing at once instead of waiting for the TTL — only while the entry is
// this process's: a process paused past the TTL and then stopped beside its
// replacement under the same id deleted the replacement's entry, and its
// dispatchers took the live worker for lost and retried its jobs (red team
// round 17, F1: 2 of 8).
func (a *Agent) deleteHeartbeat(ctx context.Context) {
	reg, err := registry.Open(ctx, a.js)
	if err != nil {
		return
	}
	e, err := reg.Entry(ctx, a.cfg.WorkerID)
	if err != nil {
		return // gone already, or unreadable: nothing of ours to remove
	}
	var hb schemas.HeartbeatMsg
	if json.Unmarshal(e.Value(), &hb) != nil || !hb.StartedAt.Equal(a.startedAt) {
		a.log.Warn().Time("entry_started_at", hb.StartedAt).Msg("the registry entry is another process's under this worker id; left in place")
		return
	}
	if err := reg.DeleteIf(ctx, a.cfg.WorkerID, e.Revision()); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		a.log.Warn().Err(err).Msg("could not remove the worker's registry entry")
	}
}
