package metrics_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/mlx-serving/mlx-serving/metrics"
)

// scraper reads a /metrics endpoint the way Prometheus does: over HTTP, in the
// text format, parsed by Prometheus' own parser.
type scraper struct {
	t   testing.TB
	url string
}

func serve(t testing.TB, gatherers ...prometheus.Gatherer) *scraper {
	srv := httptest.NewServer(metrics.Handler(gatherers...))
	t.Cleanup(srv.Close)
	return &scraper{t: t, url: srv.URL}
}

// families scrapes once.
func (s *scraper) families() map[string]*dto.MetricFamily {
	s.t.Helper()
	resp, err := http.Get(s.url)
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		s.t.Fatalf("scrape: %d %s", resp.StatusCode, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		s.t.Fatalf("scrape does not parse: %v\n%s", err, body)
	}
	return mfs
}

// value is the value of the series of name whose labels include want (a
// histogram's sample count); ok is false when there is no such series.
func value(mfs map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	mf := mfs[name]
	if mf == nil {
		return 0, false
	}
next:
	for _, m := range mf.Metric {
		have := map[string]string{}
		for _, l := range m.Label {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount()), true
		case m.Untyped != nil:
			return m.Untyped.GetValue(), true
		}
	}
	return 0, false
}

// expectation is one series value a scrape must show.
type expectation struct {
	name   string
	labels map[string]string
	want   float64
}

// waitFor scrapes until every expectation holds, or fails the test with the last
// scrape's values when ctx ends. The observer counts asynchronously (it follows
// RESULTS), so the condition, not a sleep, is what is waited on.
func (s *scraper) waitFor(ctx context.Context, exps ...expectation) map[string]*dto.MetricFamily {
	s.t.Helper()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		mfs := s.families()
		var bad []string
		for _, e := range exps {
			got, ok := value(mfs, e.name, e.labels)
			if !ok || got != e.want {
				bad = append(bad, e.name+labelText(e.labels)+": want "+ftoa(e.want)+", got "+ftoaOK(got, ok))
			}
		}
		if len(bad) == 0 {
			return mfs
		}
		select {
		case <-ctx.Done():
			s.t.Fatalf("metrics did not reach their values:\n  %s", strings.Join(bad, "\n  "))
		case <-tick.C:
		}
	}
}

func labelText(l map[string]string) string {
	if len(l) == 0 {
		return ""
	}
	var parts []string
	for k, v := range l {
		parts = append(parts, k+"="+v)
	}
	return "{" + strings.Join(parts, ",") + "}"
}

func ftoa(f float64) string { return model.SampleValue(f).String() }

func ftoaOK(f float64, ok bool) string {
	if !ok {
		return "absent"
	}
	return ftoa(f)
}

func L(kv ...string) map[string]string {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}
