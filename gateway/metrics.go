package gateway

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
)

// metrics are written by hand in the Prometheus text format (version 0.0.4): a
// handful of counters, one gauge and one histogram do not justify a dependency.
type metrics struct {
	requests     *metricVec // counter{endpoint,code}
	duration     *histogramVec
	inFlight     *metricVec // gauge
	submitted    *metricVec // counter{endpoint}
	rejected     *metricVec // counter{reason}
	disconnects  *metricVec // counter
	promptTokens *metricVec // counter
	complTokens  *metricVec // counter
	missedEvents *metricVec // counter
	recovered    *metricVec // counter
	all          []writerTo
}

type writerTo interface{ writeTo(w io.Writer) }

func newMetrics() *metrics {
	m := &metrics{
		requests: newMetricVec("mlx_gateway_http_requests_total", "counter",
			"HTTP requests answered, by endpoint and status code (499: the client left first).", "endpoint", "code"),
		duration: newHistogramVec("mlx_gateway_http_request_duration_seconds",
			"Time from request to the end of the response, by endpoint.",
			[]float64{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}, "endpoint"),
		inFlight: newMetricVec("mlx_gateway_http_requests_in_flight", "gauge",
			"HTTP requests being served now."),
		submitted: newMetricVec("mlx_gateway_jobs_submitted_total", "counter",
			"Jobs queued on the bus, by endpoint.", "endpoint"),
		rejected: newMetricVec("mlx_gateway_errors_total", "counter",
			"Error answers, by OpenAI error code (queue_full, model_not_available, invalid_value, ...).", "code"),
		disconnects: newMetricVec("mlx_gateway_client_disconnects_total", "counter",
			"Jobs cancelled because their client went away."),
		promptTokens: newMetricVec("mlx_gateway_prompt_tokens_total", "counter",
			"Prompt tokens of completed jobs, as the runtime counted them."),
		complTokens: newMetricVec("mlx_gateway_completion_tokens_total", "counter",
			"Completion tokens of completed jobs, as the runtime counted them."),
		missedEvents: newMetricVec("mlx_gateway_stream_missed_events_total", "counter",
			"Token events lost on reply subjects (gaps in the attempt/seq numbering)."),
		recovered: newMetricVec("mlx_gateway_results_recovered_total", "counter",
			"Terminal results read from RESULTS because their event was not seen."),
	}
	m.all = []writerTo{m.requests, m.duration, m.inFlight, m.submitted, m.rejected, m.disconnects,
		m.promptTokens, m.complTokens, m.missedEvents, m.recovered}
	return m
}

func (m *metrics) handler(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	for _, x := range m.all {
		x.writeTo(w)
	}
}

// metricVec is a counter or gauge with labels.
type metricVec struct {
	name, kind, help string
	labels           []string
	mu               sync.Mutex
	vals             map[string]float64
}

func newMetricVec(name, kind, help string, labels ...string) *metricVec {
	return &metricVec{name: name, kind: kind, help: help, labels: labels, vals: map[string]float64{}}
}

func (v *metricVec) add(delta float64, lvs ...string) {
	key := labelString(v.labels, lvs)
	v.mu.Lock()
	v.vals[key] += delta
	v.mu.Unlock()
}

func (v *metricVec) inc(lvs ...string) { v.add(1, lvs...) }

func (v *metricVec) get(lvs ...string) float64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.vals[labelString(v.labels, lvs)]
}

func (v *metricVec) writeTo(w io.Writer) {
	v.mu.Lock()
	defer v.mu.Unlock()
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", v.name, v.help, v.name, v.kind)
	if len(v.labels) == 0 && len(v.vals) == 0 {
		fmt.Fprintf(w, "%s 0\n", v.name)
		return
	}
	for _, k := range sortedKeys(v.vals) {
		fmt.Fprintf(w, "%s%s %s\n", v.name, k, formatFloat(v.vals[k]))
	}
}

// histogramVec is a histogram with labels.
type histogramVec struct {
	name, help string
	labels     []string
	buckets    []float64
	mu         sync.Mutex
	series     map[string]*histogram
}

type histogram struct {
	counts []uint64 // per bucket, not cumulative
	sum    float64
	count  uint64
}

func newHistogramVec(name, help string, buckets []float64, labels ...string) *histogramVec {
	return &histogramVec{name: name, help: help, labels: labels, buckets: buckets, series: map[string]*histogram{}}
}

func (h *histogramVec) observe(v float64, lvs ...string) {
	key := strings.Join(lvs, "\xff")
	h.mu.Lock()
	defer h.mu.Unlock()
	s, ok := h.series[key]
	if !ok {
		s = &histogram{counts: make([]uint64, len(h.buckets))}
		h.series[key] = s
	}
	for i, b := range h.buckets {
		if v <= b {
			s.counts[i]++
			break
		}
	}
	s.sum += v
	s.count++
}

func (h *histogramVec) writeTo(w io.Writer) {
	h.mu.Lock()
	defer h.mu.Unlock()
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s histogram\n", h.name, h.help, h.name)
	keys := make([]string, 0, len(h.series))
	for k := range h.series {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		s := h.series[k]
		lvs := strings.Split(k, "\xff")
		names := append(append([]string{}, h.labels...), "le")
		bucketLabels := func(le string) string {
			return labelString(names, append(append([]string{}, lvs...), le))
		}
		var cum uint64
		for i, b := range h.buckets {
			cum += s.counts[i]
			fmt.Fprintf(w, "%s_bucket%s %d\n", h.name, bucketLabels(formatFloat(b)), cum)
		}
		fmt.Fprintf(w, "%s_bucket%s %d\n", h.name, bucketLabels("+Inf"), s.count)
		fmt.Fprintf(w, "%s_sum%s %s\n", h.name, labelString(h.labels, lvs), formatFloat(s.sum))
		fmt.Fprintf(w, "%s_count%s %d\n", h.name, labelString(h.labels, lvs), s.count)
	}
}

// labelString renders {a="x",b="y"}; it is also the series key.
func labelString(names, values []string) string {
	if len(names) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteByte('{')
	for i, n := range names {
		if i > 0 {
			b.WriteByte(',')
		}
		val := ""
		if i < len(values) {
			val = values[i]
		}
		b.WriteString(n)
		b.WriteString(`="`)
		b.WriteString(escapeLabel(val))
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.String()
}

func escapeLabel(s string) string {
	return strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`).Replace(s)
}

func formatFloat(f float64) string {
	if math.IsInf(f, 1) {
		return "+Inf"
	}
	return strconv.FormatFloat(f, 'g', -1, 64)
}

func sortedKeys(m map[string]float64) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
