package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mlx-serving/mlx-serving/internal/breaker"
)

// workerStates and breakerStates are every value the state gauges take, so a
// state the worker is not in reads 0 instead of being absent.
var (
	workerStates  = []string{"starting", "ready", "busy", "unavailable", "draining", "stopped"}
	breakerStates = func() (out []string) {
		for _, s := range breaker.States() {
			out = append(out, s.String())
		}
		return out
	}()
)

// workerVecs are shared by every worker registered in one registry.
type workerVecs struct {
	slots, inFlight, state, breaker              *prometheus.GaugeVec
	starts, restarts, opens, assignments, schema *prometheus.CounterVec
	started, resumed, finished, attemptsReported *prometheus.CounterVec
	batchSize                                    *prometheus.HistogramVec
}

// Worker is one worker's hooks (it implements worker.Observer): pass it as
// worker.Config.Observer. Its series carry the worker_id label.
type Worker struct {
	id string
	v  *workerVecs
}

// NewWorker registers the worker metrics in reg (once per registry; more workers
// share them) and returns the hooks of worker id.
func NewWorker(reg prometheus.Registerer, id string) (*Worker, error) {
	v := &workerVecs{}
	var err error
	gauges := []struct {
		p    **prometheus.GaugeVec
		spec Spec
	}{{&v.slots, WorkerSlots}, {&v.inFlight, WorkerInFlight}, {&v.state, WorkerState}, {&v.breaker, WorkerBreaker}}
	for _, g := range gauges {
		if *g.p, err = register(reg, g.spec.gaugeVec()); err != nil {
			return nil, err
		}
	}
	counters := []struct {
		p    **prometheus.CounterVec
		spec Spec
	}{
		{&v.starts, WorkerRuntimeStarts}, {&v.restarts, WorkerRuntimeRestarts}, {&v.opens, WorkerBreakerOpens},
		{&v.assignments, WorkerAssignments}, {&v.schema, WorkerSchemaRejections}, {&v.started, WorkerJobsStarted},
		{&v.resumed, WorkerJobsResumed}, {&v.finished, WorkerJobsFinished}, {&v.attemptsReported, WorkerAttemptsReported},
	}
	for _, c := range counters {
		if *c.p, err = register(reg, c.spec.counterVec()); err != nil {
			return nil, err
		}
	}
	if v.batchSize, err = register(reg, WorkerBatchSize.histogramVec()); err != nil {
		return nil, err
	}
	w := &Worker{id: id, v: v}
	// Series that should read 0 rather than be absent before anything happens.
	v.restarts.WithLabelValues(id)
	v.opens.WithLabelValues(id)
	v.schema.WithLabelValues(id)
	for _, r := range []string{"ok", "failed"} {
		v.starts.WithLabelValues(id, r)
	}
	return w, nil
}

// Slots implements worker.Observer.
func (w *Worker) Slots(n int) { w.v.slots.WithLabelValues(w.id).Set(float64(n)) }

// InFlight implements worker.Observer.
func (w *Worker) InFlight(n int) { w.v.inFlight.WithLabelValues(w.id).Set(float64(n)) }

// State implements worker.Observer.
func (w *Worker) State(s string) { oneHot(w.v.state, w.id, workerStates, s) }

// RuntimeStart implements worker.Observer.
func (w *Worker) RuntimeStart(ok bool) {
	r := "ok"
	if !ok {
		r = "failed"
	}
	w.v.starts.WithLabelValues(w.id, r).Inc()
}

// RuntimeLost implements worker.Observer.
func (w *Worker) RuntimeLost() { w.v.restarts.WithLabelValues(w.id).Inc() }

// Breaker implements worker.Observer.
func (w *Worker) Breaker(state string) {
	oneHot(w.v.breaker, w.id, breakerStates, state)
	if state == breaker.Open.String() {
		w.v.opens.WithLabelValues(w.id).Inc()
	}
}

// Assignment implements worker.Observer.
func (w *Worker) Assignment(status string, jobs int) {
	w.v.assignments.WithLabelValues(w.id, status).Inc()
	if status == "accepted" {
		w.v.batchSize.WithLabelValues(w.id).Observe(float64(jobs))
	}
}

// SchemaRejected implements worker.Observer.
func (w *Worker) SchemaRejected() { w.v.schema.WithLabelValues(w.id).Inc() }

// JobStarted implements worker.Observer.
func (w *Worker) JobStarted(model string, _ int, resumed bool) {
	w.v.started.WithLabelValues(w.id, model).Inc()
	if resumed {
		w.v.resumed.WithLabelValues(w.id, model).Inc()
	}
}

// JobFinished implements worker.Observer.
func (w *Worker) JobFinished(model, status string) {
	w.v.finished.WithLabelValues(w.id, model, status).Inc()
}

// AttemptReported implements worker.Observer.
func (w *Worker) AttemptReported(code string) {
	w.v.attemptsReported.WithLabelValues(w.id, code).Inc()
}

// oneHot sets the gauge of state to 1 and every other known state to 0; an
// unknown state is shown too, so nothing is hidden.
func oneHot(g *prometheus.GaugeVec, id string, states []string, state string) {
	known := false
	for _, s := range states {
		v := 0.0
		if s == state {
			v, known = 1, true
		}
		g.WithLabelValues(id, s).Set(v)
	}
	if !known {
		g.WithLabelValues(id, state).Set(1)
	}
}
