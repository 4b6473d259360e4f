package metrics_test

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mlx-serving/mlx-serving/dispatcher"
	"github.com/mlx-serving/mlx-serving/metrics"
)

// Every anomaly kind reads 0 from the start and counts what the dispatcher
// reports, by kind.
func TestDispatcherAnomalies(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	d, err := metrics.NewDispatcher(reg)
	if err != nil {
		t.Fatal(err)
	}
	var _ dispatcher.Observer = d
	d.Series(nil, nil, dispatcher.Anomalies(), nil)
	d.Anomaly(dispatcher.AnomalyBadCancel)
	d.Anomaly(dispatcher.AnomalyBadCancel)
	s := serve(t, reg)
	mfs := s.families()
	for kind, want := range map[string]float64{dispatcher.AnomalyBadCancel: 2, dispatcher.AnomalyBaseClamped: 0, dispatcher.AnomalyDuplicateMsg: 0} {
		got, ok := value(mfs, "mlx_dispatcher_anomalies_total", L("kind", kind))
		if !ok || got != want {
			t.Errorf("anomalies{kind=%q} = %s, want %v", kind, ftoaOK(got, ok), want)
		}
	}
}
