package gateway

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/gateway/gatewaybus"
	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	fleetreg "github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	shared "github.com/mlx-serving/mlx-serving/metrics"
	"github.com/mlx-serving/mlx-serving/schemas"
)

const testModel = "tiny-model"

// testBus is the one test bus (internal/testenv): an embedded NATS server with
// provisioned streams, and a connection (nc, js).
type testBus struct {
	*testenv.Bus
	nc *nats.Conn
	js jetstream.JetStream
}

func startBus(t *testing.T, popts jsprov.Options) *testBus {
	t.Helper()
	b := testenv.StartBus(t, popts)
	return &testBus{Bus: b, nc: b.Conn, js: b.JS}
}

// connect opens another connection, closed with the test.
func (tb *testBus) connect(t *testing.T) *nats.Conn {
	t.Helper()
	return testenv.Connect(t, tb.Server.ClientURL())
}

// registerWorker puts a heartbeat into the worker registry.
func (tb *testBus) registerWorker(t *testing.T, id, state string, models ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	now := time.Now().UTC()
	if models == nil {
		models = []string{} // a worker without a loaded model announces []
	}
	hb := schemas.HeartbeatMsg{WorkerID: id, Hostname: "test", Platform: "linux/amd64", MemoryBytes: 1 << 30,
		Models: models, Slots: 4, State: state, StartedAt: now, UpdatedAt: now}
	data, _ := json.Marshal(hb)
	if err := schemas.Validate(schemas.Heartbeat, data); err != nil {
		t.Fatalf("heartbeat invalid: %v", err)
	}
	if _, err := tb.Workers.Put(ctx, id, data); err != nil {
		t.Fatal(err)
	}
	// A worker with models loaded has announced them in the models bucket, as
	// worker.Agent does while it can run them.
	if len(models) > 0 {
		kv, err := tb.js.KeyValue(ctx, subjects.BucketModels)
		if err != nil {
			t.Fatal(err)
		}
		if err := fleetreg.AnnounceModels(ctx, kv, models); err != nil {
			t.Fatal(err)
		}
	}
}

// fakeWorker is internal/fakeworker in Direct mode: it serves jobs straight
// off the job subjects with no dispatcher in between, so a test scripts exactly
// what reaches the reply subject (lost events, missing terminals, attempts that
// start over) and the record in RESULTS, with fakeworker.Plan.
type fakeWorker struct{ *fakeworker.Worker }

// startFakeWorker serves every job: attempt i follows plans[i-1], the last plan
// serving any later attempt (none: the zero Plan).
func startFakeWorker(t *testing.T, tb *testBus, plans ...fakeworker.Plan) fakeWorker {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	w, err := fakeworker.Start(ctx, tb.connect(t), fakeworker.Options{ID: "fake-1", Slots: 4, Models: []string{testModel}, Direct: true,
		Errorf: t.Errorf, Logf: t.Logf, Plan: func(aj schemas.AssignedJob) fakeworker.Plan {
			if len(plans) == 0 {
				return fakeworker.Plan{}
			}
			return plans[min(aj.Attempt, len(plans))-1]
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Stop)
	return fakeWorker{w}
}

// eachRetry runs f against a gateway of its own whose every job is retried:
// its first attempt crashes after two of tokens and the retry resumes, then (a
// second subtest) starts over and regenerates them.
func eachRetry(t *testing.T, tokens []string, f func(t *testing.T, url string)) {
	for _, startOver := range []bool{false, true} {
		t.Run(fmt.Sprintf("start over %v", startOver), func(t *testing.T) {
			t.Parallel()
			tb := startBus(t, jsprov.Options{})
			startFakeWorker(t, tb, fakeworker.Plan{Tokens: tokens, Crash: 2, StartOver: startOver}, fakeworker.Plan{Tokens: tokens})
			_, srv := newTestGateway(t, tb, nil)
			f(t, srv.URL)
		})
	}
}

// nextJob is the next job the fake worker received.
func (fw fakeWorker) nextJob(t *testing.T) schemas.JobRequest {
	t.Helper()
	select {
	case a := <-fw.Assignments():
		return a.Jobs[0].Job
	case <-time.After(10 * time.Second):
		t.Fatal("the fake worker received no job")
		return schemas.JobRequest{}
	}
}

// testConfig is a Config on its own connection nc, wired as cmd/mlx-serving
// wires one: gatewaybus for jobs and fleet, metrics.Gateway as the observer and
// /metrics.
func testConfig(t testing.TB, nc *nats.Conn) Config {
	t.Helper()
	gb, err := gatewaybus.New(nc, gatewaybus.Options{Stream: bus.StreamOptions{QuietAfter: 500 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	gm := shared.NewGateway()
	return Config{Jobs: gb, Fleet: gb.Fleet(), Logger: zerolog.Nop(), RequestTimeout: 30 * time.Second,
		Observer: gm, Metrics: gm.Handler()}
}

// newTestGateway serves a Gateway over httptest, on its own connection to tb.
func newTestGateway(t *testing.T, tb *testBus, mutate func(*Config)) (*Gateway, *httptest.Server) {
	t.Helper()
	return newTestGatewayOn(t, tb.connect(t), mutate)
}

// newTestGatewayOn is newTestGateway on the connection nc.
func newTestGatewayOn(t *testing.T, nc *nats.Conn, mutate func(*Config)) (*Gateway, *httptest.Server) {
	t.Helper()
	cfg := testConfig(t, nc)
	if mutate != nil {
		mutate(&cfg)
	}
	g, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(g.Handler())
	t.Cleanup(srv.Close)
	return g, srv
}

// observed is the metrics.Gateway observing g (newTestGateway's).
func observed(g *Gateway) *shared.Gateway { return g.obs.(*shared.Gateway) }

// value reads a counter or gauge.
func value(m prometheus.Metric) float64 {
	var out dto.Metric
	if err := m.Write(&out); err != nil {
		return -1
	}
	if c := out.GetCounter(); c != nil {
		return c.GetValue()
	}
	return out.GetGauge().GetValue()
}

func postJSON(t *testing.T, url string, body any, header ...string) *http.Response {
	t.Helper()
	var buf []byte
	switch b := body.(type) {
	case string:
		buf = []byte(b)
	default:
		var err error
		if buf, err = json.Marshal(body); err != nil {
			t.Fatal(err)
		}
	}
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(buf))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Add(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = resp.Body.Close() })
	return resp
}

func decode[T any](t *testing.T, r io.Reader) T {
	t.Helper()
	var v T
	data, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &v); err != nil {
		t.Fatalf("decode %s: %v", data, err)
	}
	return v
}

// openAIError is the error body as clients parse it; Param and Code may be null.
type openAIError struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    *string `json:"code"`
	} `json:"error"`
}

func expectError(t *testing.T, resp *http.Response, status int, param, code string) openAIError {
	t.Helper()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != status {
		t.Fatalf("status %d, want %d: %s", resp.StatusCode, status, data)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Fatalf("content type %q", ct)
	}
	var e openAIError
	if err := json.Unmarshal(data, &e); err != nil {
		t.Fatalf("error body %s: %v", data, err)
	}
	if e.Error.Message == "" || e.Error.Type == "" {
		t.Fatalf("error body lacks message or type: %s", data)
	}
	gotParam := ""
	if e.Error.Param != nil {
		gotParam = *e.Error.Param
	}
	if gotParam != param {
		t.Fatalf("param %q, want %q: %s", gotParam, param, data)
	}
	if code != "" && (e.Error.Code == nil || *e.Error.Code != code) {
		t.Fatalf("code %v, want %q: %s", e.Error.Code, code, data)
	}
	return e
}

// expectUsage checks a whole answer's usage: prompt and completion tokens,
// their total, and the cached ones in OpenAI's prompt_tokens_details.
func expectUsage(t *testing.T, body map[string]any, prompt, completion, cached float64) {
	t.Helper()
	u, _ := body["usage"].(map[string]any)
	if u["prompt_tokens"] != prompt || u["completion_tokens"] != completion || u["total_tokens"] != prompt+completion {
		t.Fatalf("usage %v, want %v prompt and %v completion tokens", u, prompt, completion)
	}
	if d, _ := u["prompt_tokens_details"].(map[string]any); d == nil || d["cached_tokens"] != cached {
		t.Fatalf("usage.prompt_tokens_details %v, want cached_tokens %v", u["prompt_tokens_details"], cached)
	}
}

// readSSE returns the data payloads of an event stream, in order.
func readSSE(t *testing.T, resp *http.Response) []string {
	t.Helper()
	events, _ := readSSEComments(t, resp)
	return events
}

// readSSEComments is readSSE that also counts the comment lines (": ...",
// which clients skip: sseWriter.keepAlive).
func readSSEComments(t *testing.T, resp *http.Response) (events []string, comments int) {
	t.Helper()
	if resp.StatusCode != http.StatusOK {
		data, _ := io.ReadAll(resp.Body)
		t.Fatalf("status %d: %s", resp.StatusCode, data)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		t.Fatalf("content type %q", ct)
	}
	var out []string
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		if strings.HasPrefix(line, ":") {
			comments++
			continue
		}
		payload, ok := strings.CutPrefix(line, "data: ")
		if !ok {
			t.Fatalf("unexpected SSE line %q", line)
		}
		out = append(out, payload)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out, comments
}

// chatBody builds a chat request body.
func chatBody(stream bool, extra map[string]any) map[string]any {
	b := map[string]any{
		"model":    testModel,
		"messages": []map[string]any{{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}},
		"stream":   stream,
	}
	for k, v := range extra {
		b[k] = v
	}
	return b
}
