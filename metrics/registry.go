package metrics

import (
	"errors"
	"net/http"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
)

var (
	defaultOnce sync.Once
	defaultReg  *prometheus.Registry
)

// Default is the process's registry: the Go runtime and process collectors, and
// whatever the process's parts register (fleet observer, dispatcher, workers).
// Every /metrics endpoint of the process serves it.
func Default() *prometheus.Registry {
	defaultOnce.Do(func() { defaultReg = NewRegistry() })
	return defaultReg
}

// NewRegistry is a registry with the Go runtime and process collectors, for
// tests and embedders that want their own.
func NewRegistry() *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}

// register registers c, or returns the equal collector registered before: several
// workers in one process share one set of vectors, told apart by worker_id.
func register[T prometheus.Collector](reg prometheus.Registerer, c T) (T, error) {
	err := reg.Register(c)
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		if existing, ok := are.ExistingCollector.(T); ok {
			return existing, nil
		}
	}
	return c, err
}

// Handler serves the union of gatherers in the Prometheus text format.
func Handler(gatherers ...prometheus.Gatherer) http.Handler {
	return promhttp.HandlerFor(declaredOrder{prometheus.Gatherers(gatherers)}, promhttp.HandlerOpts{
		ErrorHandling: promhttp.ContinueOnError,
	})
}

// declaredOrder puts each series' labels in the order its Spec declares them.
// The client library sorts them by name; the gateway has always exposed
// {endpoint,code}, and scrapers do not care, but grep-based checks and alert
// snippets written against the old output do.
type declaredOrder struct{ g prometheus.Gatherer }

func (d declaredOrder) Gather() ([]*dto.MetricFamily, error) {
	mfs, err := d.g.Gather()
	for _, mf := range mfs {
		spec, ok := Lookup(mf.GetName())
		if !ok || len(spec.Labels) < 2 {
			continue
		}
		rank := make(map[string]int, len(spec.Labels))
		for i, l := range spec.Labels {
			rank[l] = i
		}
		for _, m := range mf.Metric {
			// The slice may be the collector's own (const metrics share it): copy.
			m.Label = reorder(append([]*dto.LabelPair(nil), m.Label...), rank)
		}
	}
	return mfs, err
}

// reorder sorts labels by rank (insertion sort: a handful of labels); unranked
// labels (le, quantile) keep their place after the ranked ones.
func reorder(labels []*dto.LabelPair, rank map[string]int) []*dto.LabelPair {
	key := func(l *dto.LabelPair) int {
		if r, ok := rank[l.GetName()]; ok {
			return r
		}
		return len(rank)
	}
	for i := 1; i < len(labels); i++ {
		for j := i; j > 0 && key(labels[j]) < key(labels[j-1]); j-- {
			labels[j], labels[j-1] = labels[j-1], labels[j]
		}
	}
	return labels
}
