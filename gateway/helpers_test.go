package gateway

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/gateway/gatewaybus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/results"
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
}

// script says what the fake worker does with each job.
type script struct {
	tokens     []string
	status     string // default completed
	finish     string // default stop
	errCode    string
	hangAfter  int  // >0: send this many tokens, then never finish
	hang       bool // send nothing, never finish
	skipSeq    int  // >0: do not publish the token event with this seq (a lost event)
	noTerminal bool // record the result but do not publish its event
	prompt     int  // prompt tokens to report
	cached     int  // of them, from the runtime's prompt cache
	// restartAfter >0: after this many tokens, attempt 2 starts over from offset
	// 0 (its dispatcher lost what was sent) and streams restartTokens, or the same
	// tokens when nil.
	restartAfter  int
	restartTokens []string
}

// fakeWorker serves jobs straight off the job subjects: core subscribers see every
// message published into JOBS, so no dispatcher runs. It is not
// internal/fakeworker (a worker that registers, takes assignments from a
// dispatcher and answers on the worker subjects): the gateway's tests script
// what reaches the reply subject (lost events, missing terminals, rewinds)
// without the dispatcher in between. It streams the script's tokens to reply_to, records
// the result in RESULTS and publishes it, as a real worker does.
type fakeWorker struct {
	nc  *nats.Conn
	js  jetstream.JetStream
	scr script
	mu  sync.Mutex
	got []schemas.JobRequest
	new chan schemas.JobRequest
}

func startFakeWorker(t *testing.T, tb *testBus, scr script) *fakeWorker {
	t.Helper()
	nc := tb.connect(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if scr.status == "" {
		scr.status = schemas.StatusCompleted
	}
	if scr.finish == "" && scr.status == schemas.StatusCompleted {
		scr.finish = "stop"
	}
	fw := &fakeWorker{nc: nc, js: js, scr: scr, new: make(chan schemas.JobRequest, 64)}
	_, err = nc.Subscribe(subjects.JobsAll, func(m *nats.Msg) {
		var job schemas.JobRequest
		if err := json.Unmarshal(m.Data, &job); err != nil {
			return
		}
		fw.mu.Lock()
		fw.got = append(fw.got, job)
		fw.mu.Unlock()
		fw.new <- job
		go fw.serve(job)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	tb.registerWorker(t, "fake-1", schemas.WorkerReady, testModel)
	return fw
}

func (fw *fakeWorker) nextJob(t *testing.T) schemas.JobRequest {
	t.Helper()
	select {
	case j := <-fw.new:
		return j
	case <-time.After(10 * time.Second):
		t.Fatal("the fake worker received no job")
		return schemas.JobRequest{}
	}
}

// fakeLogprob is the entry the fake worker reports for token d at position i
// when the job asks for logprobs: logprob -(i+1)/10 and job.Logprobs alternatives.
func fakeLogprob(job schemas.JobRequest, i int, d string) []schemas.TokenLogprob {
	if job.Logprobs == nil {
		return nil
	}
	b := make([]int, len(d))
	for k := range len(d) {
		b[k] = int(d[k])
	}
	e := schemas.TokenLogprob{Token: d, Logprob: -float64(i+1) / 10, Bytes: b, TopLogprobs: []schemas.TopLogprob{}}
	for k := range *job.Logprobs {
		e.TopLogprobs = append(e.TopLogprobs, schemas.TopLogprob{Token: d + strings.Repeat("'", k), Logprob: -float64(i+1+k) / 10, Bytes: b})
	}
	return []schemas.TokenLogprob{e}
}

func (fw *fakeWorker) serve(job schemas.JobRequest) {
	s := fw.scr
	if s.hang {
		return
	}
	var lps []schemas.TokenLogprob // the final attempt's entries
	var text strings.Builder
	attempt, tokens := 1, s.tokens
	for i, d := range s.tokens {
		if s.restartAfter > 0 && i == s.restartAfter {
			attempt, text, lps = 2, strings.Builder{}, nil
			if tokens = s.restartTokens; tokens == nil {
				tokens = s.tokens
			}
			for k, d := range tokens {
				ev := schemas.TokenEventMsg{Type: "token", JobID: job.ID, Attempt: 2, Seq: k, Delta: d, Tokens: k + 1, Offset: text.Len(),
					Logprobs: fakeLogprob(job, k, d)}
				lps = append(lps, ev.Logprobs...)
				text.WriteString(d)
				data, _ := json.Marshal(ev)
				_ = fw.nc.Publish(job.ReplyTo, data)
			}
			break
		}
		if s.hangAfter > 0 && i == s.hangAfter {
			_ = fw.nc.Flush()
			return
		}
		ev := schemas.TokenEventMsg{Type: "token", JobID: job.ID, Attempt: 1, Seq: i, Delta: d, Tokens: i + 1, Offset: text.Len(),
			Logprobs: fakeLogprob(job, i, d)}
		lps = append(lps, ev.Logprobs...)
		text.WriteString(d)
		if s.skipSeq > 0 && i == s.skipSeq {
			continue
		}
		data, _ := json.Marshal(ev)
		_ = fw.nc.Publish(job.ReplyTo, data)
	}
	res := schemas.ResultMsg{Type: "result", JobID: job.ID, Attempt: attempt, Seq: len(tokens), Status: s.status,
		FinishReason: s.finish, Text: text.String(), Model: job.Model, Tenant: job.Tenant, WorkerID: "fake-1", FinishedAt: time.Now().UTC(),
		Usage:    schemas.Usage{PromptTokens: s.prompt, CompletionTokens: len(tokens), TotalTokens: s.prompt + len(tokens), CachedTokens: s.cached},
		Logprobs: lps}
	if s.errCode != "" {
		res.Error = &schemas.ErrorInfo{Code: s.errCode, Message: "fake failure: " + s.errCode}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := results.Record(ctx, fw.js, &res); err != nil {
		return
	}
	if !s.noTerminal {
		data, _ := json.Marshal(res)
		_ = fw.nc.Publish(job.ReplyTo, data)
	}
	_ = fw.nc.Flush()
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
		req.Header.Set(header[i], header[i+1])
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

// readSSE returns the data payloads of an event stream, in order.
func readSSE(t *testing.T, resp *http.Response) []string {
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
		payload, ok := strings.CutPrefix(line, "data: ")
		if !ok {
			t.Fatalf("unexpected SSE line %q", line)
		}
		out = append(out, payload)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
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
