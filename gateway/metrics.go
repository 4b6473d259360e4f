package gateway

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	shared "github.com/mlx-serving/mlx-serving/metrics"
)

// metrics are the gateway's series, named and described in package metrics;
// /metrics serves them together with the process's shared registry (the fleet
// observer, and in `up` the dispatcher and the worker too). The small adapters
// below keep the call sites short: inc, add, observe, get.
type metrics struct {
	m            *shared.Gateway
	requests     *metricVec // counter{endpoint,code}
	duration     *histogramVec
	inFlight     *metricVec // gauge
	submitted    *metricVec // counter{endpoint}
	rejected     *metricVec // counter{code}
	disconnects  *metricVec
	promptTokens *metricVec
	complTokens  *metricVec
	missedEvents *metricVec
	recovered    *metricVec
	// all are further collectors served with the others (added after newMetrics).
	all     []prometheus.Collector
	handler http.HandlerFunc
}

func newMetrics() *metrics {
	gm := shared.NewGateway()
	m := &metrics{
		m:            gm,
		requests:     counterVec(gm.Requests),
		duration:     &histogramVec{gm.Duration},
		inFlight:     single(gm.InFlight),
		submitted:    counterVec(gm.Submitted),
		rejected:     counterVec(gm.Errors),
		disconnects:  single(gm.Disconnects),
		promptTokens: single(gm.PromptTokens),
		complTokens:  single(gm.CompletionTokens),
		missedEvents: single(gm.MissedEvents),
		recovered:    single(gm.Recovered),
	}
	m.handler = shared.Handler(shared.Default(), gm.Registry, extras{m}).ServeHTTP
	return m
}

// extras gathers metrics.all as it is at scrape time.
type extras struct{ m *metrics }

func (e extras) Gather() ([]*dto.MetricFamily, error) {
	reg := prometheus.NewRegistry()
	for _, c := range e.m.all {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return reg.Gather()
}

// adder is a counter or gauge.
type adder interface {
	prometheus.Metric
	prometheus.Collector
	Add(float64)
}

// metricVec is a counter or gauge, with labels or without; it is a
// prometheus.Collector, so it can join metrics.all.
type metricVec struct {
	prometheus.Collector
	with func(lvs ...string) adder
}

// newMetricVec is a counter or gauge (kind) outside metrics.NewGateway's set.
// Name it in package metrics' catalog too, so dashboards and docs know it and
// its labels keep the order given here.
func newMetricVec(name, kind, help string, labels ...string) *metricVec {
	if kind == "gauge" {
		return gaugeVec(prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: help}, labels))
	}
	return counterVec(prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labels))
}

func counterVec(v *prometheus.CounterVec) *metricVec {
	return &metricVec{Collector: v, with: func(lvs ...string) adder { return v.WithLabelValues(lvs...) }}
}

func gaugeVec(v *prometheus.GaugeVec) *metricVec {
	return &metricVec{Collector: v, with: func(lvs ...string) adder { return v.WithLabelValues(lvs...) }}
}

func single(a adder) *metricVec {
	return &metricVec{Collector: a, with: func(...string) adder { return a }}
}

func (v *metricVec) add(delta float64, lvs ...string) { v.with(lvs...).Add(delta) }

func (v *metricVec) inc(lvs ...string) { v.add(1, lvs...) }

// get reads the current value (tests).
func (v *metricVec) get(lvs ...string) float64 {
	var out dto.Metric
	if err := v.with(lvs...).Write(&out); err != nil {
		return 0
	}
	if c := out.GetCounter(); c != nil {
		return c.GetValue()
	}
	return out.GetGauge().GetValue()
}

type histogramVec struct{ v *prometheus.HistogramVec }

func (h *histogramVec) observe(x float64, lvs ...string) { h.v.WithLabelValues(lvs...).Observe(x) }
