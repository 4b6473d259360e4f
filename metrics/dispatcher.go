package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Dispatcher is a dispatcher's hooks (it implements dispatcher.Observer): pass
// it as dispatcher.Config.Observer. Dispatchers registered in one registry
// share its series.
type Dispatcher struct {
	pulled, batches, assigned, refused, assignErrors, retries    prometheus.Counter
	alreadyDone, notAJob, forged, lost, deaf, restarted, illegal prometheus.Counter
	writeFailures                                                prometheus.Counter
	recordsHeld                                                  prometheus.Gauge
	finished, routed, transitions, anomalies                     *prometheus.CounterVec
}

// NewDispatcher registers the dispatcher metrics in reg (or finds them there)
// and returns the hooks.
func NewDispatcher(reg prometheus.Registerer) (*Dispatcher, error) {
	d := &Dispatcher{}
	counters := []struct {
		p    *prometheus.Counter
		spec Spec
	}{
		{&d.pulled, DispatcherPulled}, {&d.batches, DispatcherBatches}, {&d.assigned, DispatcherAssigned},
		{&d.refused, DispatcherAssignFull}, {&d.assignErrors, DispatcherAssignErrors}, {&d.retries, DispatcherRetries},
		{&d.alreadyDone, DispatcherAlreadyDone}, {&d.notAJob, DispatcherNotAJob}, {&d.forged, DispatcherForged},
		{&d.lost, DispatcherWorkersLost}, {&d.deaf, DispatcherDeafTicks}, {&d.restarted, DispatcherWorkersRestarted}, {&d.illegal, DispatcherIllegal},
		{&d.writeFailures, DispatcherWriteFailures},
	}
	var err error
	for _, c := range counters {
		if *c.p, err = register(reg, c.spec.counter()); err != nil {
			return nil, err
		}
	}
	if d.recordsHeld, err = register(reg, DispatcherRecordsHeld.gauge()); err != nil {
		return nil, err
	}
	vecs := []struct {
		p    **prometheus.CounterVec
		spec Spec
	}{{&d.finished, DispatcherFinished}, {&d.routed, DispatcherRouted}, {&d.transitions, DispatcherTransitions}, {&d.anomalies, DispatcherAnomalies}}
	for _, v := range vecs {
		if *v.p, err = register(reg, v.spec.counterVec()); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// Series implements dispatcher.Observer: every labelled series reads 0 from
// the start.
func (d *Dispatcher) Series(finished, reasons, anomalies []string, transitions [][2]string) {
	for _, k := range anomalies {
		d.anomalies.WithLabelValues(k)
	}
	for _, s := range finished {
		d.finished.WithLabelValues(s)
	}
	for _, r := range reasons {
		d.routed.WithLabelValues(r)
	}
	for _, t := range transitions {
		d.transitions.WithLabelValues(t[0], t[1])
	}
}

// Pulled implements dispatcher.Observer.
func (d *Dispatcher) Pulled(n int) { d.pulled.Add(float64(n)) }

// Routed implements dispatcher.Observer.
func (d *Dispatcher) Routed(reason string) { d.routed.WithLabelValues(reason).Inc() }

// Accepted implements dispatcher.Observer.
func (d *Dispatcher) Accepted(jobs int) { d.batches.Inc(); d.assigned.Add(float64(jobs)) }

// Refused implements dispatcher.Observer.
func (d *Dispatcher) Refused() { d.refused.Inc() }

// AssignFailed implements dispatcher.Observer.
func (d *Dispatcher) AssignFailed() { d.assignErrors.Inc() }

// Retried implements dispatcher.Observer.
func (d *Dispatcher) Retried() { d.retries.Inc() }

// Finished implements dispatcher.Observer.
func (d *Dispatcher) Finished(state string) { d.finished.WithLabelValues(state).Inc() }

// AlreadyFinished implements dispatcher.Observer.
func (d *Dispatcher) AlreadyFinished() { d.alreadyDone.Inc() }

// NotAJob implements dispatcher.Observer.
func (d *Dispatcher) NotAJob() { d.notAJob.Inc() }

// Forged implements dispatcher.Observer.
func (d *Dispatcher) Forged() { d.forged.Inc() }

// WorkerLost implements dispatcher.Observer.
func (d *Dispatcher) WorkerLost() { d.lost.Inc() }

// DeafTick implements dispatcher.Observer.
func (d *Dispatcher) DeafTick() { d.deaf.Inc() }

// WorkerRestarted implements dispatcher.Observer.
func (d *Dispatcher) WorkerRestarted() { d.restarted.Inc() }

// Transition implements dispatcher.Observer.
func (d *Dispatcher) Transition(from, event string) { d.transitions.WithLabelValues(from, event).Inc() }

// IllegalTransition implements dispatcher.Observer.
func (d *Dispatcher) IllegalTransition() { d.illegal.Inc() }

// WriteFailed implements dispatcher.Observer.
func (d *Dispatcher) WriteFailed() { d.writeFailures.Inc() }

// RecordsHeld implements dispatcher.Observer.
func (d *Dispatcher) RecordsHeld(delta int) { d.recordsHeld.Add(float64(delta)) }

// Anomaly implements dispatcher.Observer.
func (d *Dispatcher) Anomaly(kind string) { d.anomalies.WithLabelValues(kind).Inc() }
