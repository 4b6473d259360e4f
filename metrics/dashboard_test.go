package metrics_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/metrics"
)

// dashboardPath is the Grafana dashboard shipped in ops/.
var dashboardPath = filepath.Join(testenv.RepoRoot(), "ops", "grafana", "mlx-serving.json")

// panel is the part of a Grafana panel the test reads; rows nest panels.
type panel struct {
	Title   string  `json:"title"`
	Type    string  `json:"type"`
	Panels  []panel `json:"panels"`
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
}

type dashboard struct {
	Title      string  `json:"title"`
	UID        string  `json:"uid"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query any    `json:"query"`
		} `json:"list"`
	} `json:"templating"`
}

var (
	// selector is a metric name with its optional label matchers.
	selector   = regexp.MustCompile(`\b((?:mlx|go|process)_[a-zA-Z0-9_:]*)(\{[^}]*\})?`)
	matcherKey = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)`)
)

// scrapeLabels are added by Prometheus to every series, not by the process.
var scrapeLabels = map[string]bool{"instance": true, "job": true}

// TestDashboardMetricsExist: every metric the dashboard's PromQL names is in the
// catalog, and every label it matches on is one of that metric's labels — so the
// dashboard cannot drift from what the processes export.
func TestDashboardMetricsExist(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatalf("%s is not JSON: %v", dashboardPath, err)
	}
	if d.UID == "" || d.Title == "" {
		t.Fatal("dashboard has no uid or title")
	}
	var exprs []string
	var walk func(ps []panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			if p.Type != "row" && p.Type != "text" && len(p.Targets) == 0 {
				t.Errorf("panel %q has no query", p.Title)
			}
			for _, tg := range p.Targets {
				if strings.TrimSpace(tg.Expr) == "" {
					t.Errorf("panel %q has an empty query", p.Title)
				}
				exprs = append(exprs, tg.Expr)
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue // datasource pickers and constants hold no PromQL
		}
		switch q := v.Query.(type) {
		case string:
			exprs = append(exprs, q)
		case map[string]any:
			if s, ok := q["query"].(string); ok {
				exprs = append(exprs, s)
			}
		}
	}
	if len(exprs) < 10 {
		t.Fatalf("only %d queries in the dashboard", len(exprs))
	}
	used := checkExprs(t, exprs)
	// The list: each must be on the dashboard.
	for _, must := range []metrics.Spec{
		metrics.FleetQueueDepth, metrics.FleetFinished, metrics.DispatcherRetries, metrics.WorkerJobsResumed,
		metrics.FleetDLQ, metrics.DispatcherBatches, metrics.DispatcherAssigned, metrics.WorkerBatchSize,
		metrics.FleetTTFT, metrics.FleetTokensPS, metrics.FleetSlots, metrics.FleetInFlight,
		metrics.WorkerRuntimeRestarts, metrics.WorkerBreaker, metrics.FleetInvalid,
	} {
		if !used[must.Name] {
			t.Errorf("dashboard does not show %s", must.Name)
		}
	}
}

// checkExprs fails t for every metric an expression names that is not in the
// catalog, and every label it matches on that the metric does not have; it
// returns the catalog names used.
func checkExprs(t *testing.T, exprs []string) map[string]bool {
	t.Helper()
	used := map[string]bool{}
	for _, e := range exprs {
		ms := selector.FindAllStringSubmatch(e, -1)
		if len(ms) == 0 && !strings.Contains(e, "up{") {
			t.Errorf("query names no mlx-serving metric: %s", e)
		}
		for _, m := range ms {
			name := m[1]
			if strings.HasPrefix(name, "go_") || strings.HasPrefix(name, "process_") {
				continue // the runtime's standard collectors, in every registry
			}
			spec, ok := metrics.Lookup(name)
			if !ok {
				t.Errorf("unknown metric %s in: %s", name, e)
				continue
			}
			used[spec.Name] = true
			allowed := map[string]bool{}
			for _, l := range spec.Labels {
				allowed[l] = true
			}
			if strings.HasSuffix(name, "_bucket") {
				allowed["le"] = true
			}
			for _, k := range matcherKey.FindAllStringSubmatch(m[2], -1) {
				if !allowed[k[1]] && !scrapeLabels[k[1]] {
					t.Errorf("%s has no label %q (query: %s)", name, k[1], e)
				}
			}
		}
	}
	return used
}

// TestAlertRulesMetricsExist: the same check for ops/prometheus/alerts.yml.
func TestAlertRulesMetricsExist(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "ops", "prometheus", "alerts.yml"))
	if err != nil {
		t.Fatal(err)
	}
	var rules struct {
		Groups []struct {
			Rules []struct {
				Alert       string            `json:"alert"`
				Expr        string            `json:"expr"`
				Annotations map[string]string `json:"annotations"`
			} `json:"rules"`
		} `json:"groups"`
	}
	if err := yaml.Unmarshal(raw, &rules); err != nil {
		t.Fatal(err)
	}
	var exprs []string
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			exprs = append(exprs, r.Expr)
			rb := r.Annotations["runbook"]
			if _, err := os.Stat(filepath.Join(testenv.RepoRoot(), rb)); rb == "" || err != nil {
				t.Errorf("alert %s: runbook %q missing", r.Alert, rb)
			}
		}
	}
	if len(exprs) == 0 {
		t.Fatal("no alert rules")
	}
	checkExprs(t, exprs)
}
