package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mlx-serving/mlx-serving/dispatcher"
)

// Dispatcher exports one dispatcher's counters (dispatcher.Metrics, atomics the
// dispatcher keeps anyway), read at scrape time: no hook in the hot path.
type Dispatcher struct {
	m *dispatcher.Metrics
}

// NewDispatcher returns the collector of m; register it once per dispatcher
// (a process runs one).
func NewDispatcher(m *dispatcher.Metrics) *Dispatcher { return &Dispatcher{m: m} }

var dispatcherCounters = []struct {
	spec Spec
	get  func(*dispatcher.Metrics) int64
}{
	{DispatcherPulled, func(m *dispatcher.Metrics) int64 { return m.JobsPulled.Load() }},
	{DispatcherBatches, func(m *dispatcher.Metrics) int64 { return m.Batches.Load() }},
	{DispatcherAssigned, func(m *dispatcher.Metrics) int64 { return m.JobsAssigned.Load() }},
	{DispatcherAssignFull, func(m *dispatcher.Metrics) int64 { return m.AssignFull.Load() }},
	{DispatcherAssignErrors, func(m *dispatcher.Metrics) int64 { return m.AssignErrors.Load() }},
	{DispatcherRetries, func(m *dispatcher.Metrics) int64 { return m.Retries.Load() }},
	{DispatcherAlreadyDone, func(m *dispatcher.Metrics) int64 { return m.AlreadyFinished.Load() }},
	{DispatcherNotAJob, func(m *dispatcher.Metrics) int64 { return m.NotAJob.Load() }},
	{DispatcherForged, func(m *dispatcher.Metrics) int64 { return m.ForgedRecords.Load() }},
	{DispatcherWorkersLost, func(m *dispatcher.Metrics) int64 { return m.WorkersLost.Load() }},
	{DispatcherWorkersRestarted, func(m *dispatcher.Metrics) int64 { return m.WorkersRestarted.Load() }},
	{DispatcherIllegal, func(m *dispatcher.Metrics) int64 { return m.IllegalTransitions.Load() }},
}

var dispatcherFinished = []struct {
	state dispatcher.State
	get   func(*dispatcher.Metrics) int64
}{
	{dispatcher.StateCompleted, func(m *dispatcher.Metrics) int64 { return m.Completed.Load() }},
	{dispatcher.StateFailed, func(m *dispatcher.Metrics) int64 { return m.Failed.Load() }},
	{dispatcher.StateCancelled, func(m *dispatcher.Metrics) int64 { return m.Cancelled.Load() }},
	{dispatcher.StateExpired, func(m *dispatcher.Metrics) int64 { return m.Expired.Load() }},
	{dispatcher.StateDeadLettered, func(m *dispatcher.Metrics) int64 { return m.DeadLettered.Load() }},
}

var (
	routedDesc      = DispatcherRouted.Desc()
	finishedDesc    = DispatcherFinished.Desc()
	transitionsDesc = DispatcherTransitions.Desc()
	counterDescs    = func() []*prometheus.Desc {
		out := make([]*prometheus.Desc, len(dispatcherCounters))
		for i, c := range dispatcherCounters {
			out[i] = c.spec.Desc()
		}
		return out
	}()
)

// Describe implements prometheus.Collector.
func (d *Dispatcher) Describe(ch chan<- *prometheus.Desc) {
	for _, desc := range counterDescs {
		ch <- desc
	}
	ch <- finishedDesc
	ch <- transitionsDesc
	ch <- routedDesc
}

// Collect implements prometheus.Collector.
func (d *Dispatcher) Collect(ch chan<- prometheus.Metric) {
	for i, c := range dispatcherCounters {
		ch <- prometheus.MustNewConstMetric(counterDescs[i], prometheus.CounterValue, float64(c.get(d.m)))
	}
	for _, f := range dispatcherFinished {
		ch <- prometheus.MustNewConstMetric(finishedDesc, prometheus.CounterValue, float64(f.get(d.m)), f.state.String())
	}
	for _, r := range dispatcher.RouteReasons() {
		ch <- prometheus.MustNewConstMetric(routedDesc, prometheus.CounterValue, float64(d.m.RoutedCount(r)), r.String())
	}
	for _, t := range legalTransitions {
		ch <- prometheus.MustNewConstMetric(transitionsDesc, prometheus.CounterValue,
			float64(d.m.TransitionCount(t.s, t.e)), t.s.String(), t.e.String())
	}
}

// legalTransitions are the table's legal (state, event) pairs: the others can
// never move, so they are not exported.
var legalTransitions = func() []transitionPair {
	var m dispatcher.Metrics
	var out []transitionPair
	for s := range len(m.Transitions) {
		for e := range len(m.Transitions[s]) {
			p := transitionPair{dispatcher.State(s), dispatcher.Event(e)}
			if _, err := dispatcher.Transition(p.s, p.e); err == nil {
				out = append(out, p)
			}
		}
	}
	return out
}()

type transitionPair struct {
	s dispatcher.State
	e dispatcher.Event
}
