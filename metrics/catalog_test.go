package metrics_test

import (
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/model"

	"github.com/mlx-serving/mlx-serving/dispatcher"
	"github.com/mlx-serving/mlx-serving/gateway"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/metrics"
	"github.com/mlx-serving/mlx-serving/worker"
)

var (
	_ worker.Observer     = (*metrics.Worker)(nil)
	_ dispatcher.Observer = (*metrics.Dispatcher)(nil)
	_ gateway.Observer    = (*metrics.Gateway)(nil)
)

// TestCatalog: names follow Prometheus' rules and conventions, and the catalog
// is exactly what the collectors export — nothing undocumented, nothing stale.
func TestCatalog(t *testing.T) {
	t.Parallel()
	seen := map[string]bool{}
	for _, s := range metrics.Catalog() {
		switch {
		case !model.LegacyValidation.IsValidMetricName(s.Name):
			t.Errorf("%s: invalid metric name", s.Name)
		case seen[s.Name]:
			t.Errorf("%s: defined twice", s.Name)
		case !strings.HasPrefix(s.Name, "mlx_"):
			t.Errorf("%s: not under mlx_", s.Name)
		case s.Help == "":
			t.Errorf("%s: no help", s.Name)
		case (s.Kind == metrics.Counter) != strings.HasSuffix(s.Name, "_total"):
			t.Errorf("%s: counters, and only counters, end in _total", s.Name)
		case s.Kind == metrics.Histogram && len(s.Buckets) == 0:
			t.Errorf("%s: histogram without buckets", s.Name)
		}
		seen[s.Name] = true
	}

	b := testenv.StartBus(t, jsprov.Options{})
	f, err := metrics.NewFleet(metrics.FleetOptions{Conn: b.Conn, SampleTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(f)
	if _, err := metrics.NewDispatcher(reg); err != nil {
		t.Fatal(err)
	}
	// A second dispatcher in the same registry shares the series.
	if _, err := metrics.NewDispatcher(reg); err != nil {
		t.Fatal(err)
	}
	if _, err := metrics.NewWorker(reg, "w1"); err != nil {
		t.Fatal(err)
	}
	// A second worker in the same registry shares the vectors.
	if _, err := metrics.NewWorker(reg, "w2"); err != nil {
		t.Fatal(err)
	}
	exported := map[string]bool{}
	fqName := regexp.MustCompile(`fqName: "([^"]+)"`)
	for _, c := range []prometheus.Collector{f, metrics.NewGateway().Registry, reg} {
		ch := make(chan *prometheus.Desc, 256)
		go func() { c.Describe(ch); close(ch) }()
		for d := range ch {
			if m := fqName.FindStringSubmatch(d.String()); m != nil {
				exported[m[1]] = true
			}
		}
	}
	for name := range exported {
		if _, ok := metrics.Lookup(name); !ok {
			t.Errorf("%s is exported but not in the catalog", name)
		}
	}
	for name := range seen {
		if !exported[name] {
			t.Errorf("%s is in the catalog but no collector exports it", name)
		}
	}
}

// TestDeclaredLabelOrder: the exposition keeps the label order the catalog
// declares (endpoint before code), which the client library would sort away.
func TestDeclaredLabelOrder(t *testing.T) {
	t.Parallel()
	g := metrics.NewGateway()
	g.Requests.WithLabelValues("chat_completions", "200").Inc()
	s := serve(t, g.Registry)
	mfs := s.families()
	m := mfs["mlx_gateway_http_requests_total"].Metric[0]
	if m.Label[0].GetName() != "endpoint" || m.Label[1].GetName() != "code" {
		t.Fatalf("labels %v, want endpoint then code", m.Label)
	}
}
