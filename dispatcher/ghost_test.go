package dispatcher

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A burst of jobs for a model nobody ever announced (a raw publish skips the
// producer's model check) is dead-lettered at once, not held ModelWait each:
// held, they would fill the credit (free slots + MaxBatch, shared by every
// tenant) and the job behind them, for a served model, would wait out their
// ModelWait. ModelWait is a minute here: the served job's result comes well
// inside the wait below only if the ghosts went at once.
// Mutation caught: dispatcher/availability.go deadLetterUnserved, drop the
// `wait = 0` branch for never-announced models (the served job times out).
func TestNeverAnnouncedModelIsDeadLetteredAtOnce(t *testing.T) {
	t.Parallel()
	const ghosts = 40 // > free slots (2) + MaxBatch (8)
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, nil)
	cfg := testConfig("d1", e.connect("d1"))
	cfg.ModelWait = time.Minute
	d, _ := runDispatcher(t, cfg)
	for i := range ghosts {
		e.mustSubmit(newJob(fmt.Sprintf("ghost-%02d", i), "ghost", "normal"))
	}
	served := newJob("served", "m", "normal")
	if r := e.waitResultAfter(served, 20*time.Second); r.Status != schemas.StatusCompleted || r.Text != fullText(5) {
		t.Fatalf("served job behind the ghosts: %+v err %+v", r, r.Error)
	}
	for i := range ghosts {
		id := fmt.Sprintf("ghost-%02d", i)
		r := e.waitResult(id, 20*time.Second)
		if r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != schemas.CodeModelNotAvailable {
			t.Fatalf("%s: %+v err %+v", id, r, r.Error)
		}
	}
	if n := d.Metrics().TransitionCount(StateQueued, EvDeadLetter); n != ghosts {
		t.Fatalf("queued→dead_lettered counted %d, want %d", n, ghosts)
	}
	if n := e.streamMsgs(subjects.StreamDLQ); n != ghosts {
		t.Fatalf("DLQ holds %d records, want %d", n, ghosts)
	}
	if a, _, _ := w.Snapshot(); len(a) != 1 || a["served"] != 1 {
		t.Fatalf("worker ran %v, want only the served job", a)
	}
}

// A model announced recently (its worker gone, maybe reloading it) is not a
// ghost: its job waits ModelWait as before, and only past it is dead-lettered.
// Once the bucket has answered, a scheduling pass now leaves the job waiting;
// a look with a clock past ModelWait ends it, so nothing sleeps.
// Mutation caught: dispatcher/availability.go deadLetterUnserved, `wait = 0` for
// every unserved model whatever the bucket answered (the first pass ends it).
func TestRecentlyAnnouncedModelWaits(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w1", 2, []string{"other"}, nil)
	e.announce("recent")
	cfg := testConfig("d1", e.connect("d1"))
	cfg.ModelWait = time.Minute
	d, _ := runDispatcher(t, cfg)
	j := newJob("waits", "recent", "normal")
	e.mustSubmit(j)
	key := subjects.JobRef{ID: j.ID}.Key()
	// The lookup starts only once the job is held and found unserved.
	waitAnswered(t, d, "recent")
	d.schedule(time.Now())
	d.mu.Lock()
	h := d.jobs[key]
	waiting := h != nil && h.inQueue && h.state == StateQueued
	var enqueued time.Time
	if waiting {
		enqueued = h.enqueued
	}
	d.mu.Unlock()
	if !waiting || d.Metrics().TransitionCount(StateQueued, EvDeadLetter) != 0 {
		t.Fatalf("a recently announced model's job ended at once (held %v); it should wait ModelWait", waiting)
	}
	// Past ModelWait, once the bucket says nobody serves it any more (its
	// announcement expired): dead-lettered. While it is still announced the
	// job is handed back to wait in JOBS (TestReloadingModelsJobsWaitInJOBS).
	// (The workers' liveness is not what is tested here: a pass that far
	// ahead would find them all stale, an outage.)
	later := enqueued.Add(2 * cfg.ModelWait)
	a := d.announced
	a.mu.Lock()
	a.byName["recent"] = announcement{never: true, at: later}
	a.mu.Unlock()
	d.mu.Lock()
	d.deadLetterUnserved("recent", later)
	d.mu.Unlock()
	r := e.waitResult(j.ID, 10*time.Second)
	if r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != schemas.CodeModelNotAvailable {
		t.Fatalf("past ModelWait: %+v err %+v", r, r.Error)
	}
}

// A lookup that fails leaves the model unknown: its job waits ModelWait, never
// dead-lettered on an error. The lookup is bounded by AssignTimeout; a
// nanosecond fails it before it is sent (nothing here is assigned: the only
// worker serves another model).
// Mutation caught: dispatcher/availability.go neverAnnounced, the cached answer
// `never: err == nil && !served` → `never: !served` (a failed lookup reads
// as "not served" and the job ends at once).
func TestFailedLookupWaits(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w1", 2, []string{"other"}, nil)
	cfg := testConfig("d1", e.connect("d1"))
	cfg.ModelWait = time.Minute
	cfg.AssignTimeout = time.Nanosecond
	d, _ := runDispatcher(t, cfg)
	j := newJob("unknown", "ghost", "normal")
	e.mustSubmit(j)
	waitAnswered(t, d, "ghost")
	d.schedule(time.Now())
	d.mu.Lock()
	h := d.jobs[subjects.JobRef{ID: j.ID}.Key()]
	waiting := h != nil && h.inQueue && h.state == StateQueued
	d.mu.Unlock()
	if !waiting || d.Metrics().TransitionCount(StateQueued, EvDeadLetter) != 0 {
		t.Fatalf("the job ended on a failed lookup (held %v); it should wait ModelWait", waiting)
	}
}

// announce puts models into the models bucket, as a worker that served them
// does (registry.AnnounceModels): recently served, so their jobs wait ModelWait.
func (e *testEnv) announce(models ...string) {
	e.tb.Helper()
	ctx := context.Background()
	kv, err := e.js.KeyValue(ctx, subjects.BucketModels)
	if err != nil {
		e.tb.Fatal(err)
	}
	if err := registry.AnnounceModels(ctx, kv, models); err != nil {
		e.tb.Fatal(err)
	}
}

// waitAnswered waits until d's cache holds the models bucket's answer (or a
// failed lookup) for model.
func waitAnswered(t *testing.T, d *Dispatcher, model string) {
	t.Helper()
	waitFor(t, 10*time.Second, "the models bucket's answer for "+model, func() bool {
		a := d.announced
		a.mu.Lock()
		defer a.mu.Unlock()
		_, answered := a.byName[model]
		return answered
	})
}

// A rolling restart of the only worker serving a model: while it loads, no
// live worker lists the model, though other workers are ready. Its jobs
// failed model_not_available after ModelWait (operator round 2: 26 of 30 with
// a 40 s load). The model was announced recently, so they are handed back to
// JOBS for ModelWait instead, using no attempt, until its worker is back.
// Mutation caught: dispatcher/availability.go deadLetterUnserved without its
// parkLocked branch (the job ends failed model_not_available).
func TestReloadingModelsJobsWaitInJOBS(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w1", 2, []string{"other"}, nil) // ready, without the model
	e.announce("reloading")                        // its worker served it a moment ago
	cfg := testConfig("d1", e.connect("d1"))
	cfg.ModelWait = 200 * time.Millisecond
	d, _ := runDispatcher(t, cfg)
	j := newJob("waits-for-reload", "reloading", "normal")
	e.mustSubmit(j)
	waitFor(t, 10*time.Second, "the job handed back twice", func() bool { return d.Metrics().Parked.Load() >= 2 })
	if _, err := e.result(j.ID); !errors.Is(err, bus.ErrNoResult) {
		t.Fatalf("the job ended while its model's worker was away: %v", err)
	}
	w := e.startWorker("w2", 2, []string{"reloading"}, nil) // back, with the model
	r := e.waitResult(j.ID, 10*time.Second)
	if r.Status != schemas.StatusCompleted || r.Attempt != 1 {
		t.Fatalf("after the reload: %s at attempt %d (%+v), want completed at attempt 1", r.Status, r.Attempt, r.Error)
	}
	if a, _, _ := w.Snapshot(); a[j.ID] != 1 {
		t.Fatalf("the returning worker ran %v", a)
	}
}
