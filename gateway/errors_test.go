package gateway

import (
	"context"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

func TestInvalidRequestNamesTheField(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	// A registered worker but nobody serving: a request that got past validation
	// would hang, so every case must be answered by validation alone.
	tb.registerWorker(t, "w1", schemas.WorkerReady, testModel)
	g, srv := newTestGateway(t, tb, nil)

	cases := []struct {
		name, body, param string
	}{
		{"temperature out of range", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"temperature":5}`, "temperature"},
		{"temperature wrong type", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"temperature":"hot"}`, "temperature"},
		{"top_p out of range", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"top_p":1.5}`, "top_p"},
		{"negative seed", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"seed":-1}`, "seed"},
		{"max_completion_tokens zero", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":0}`, "max_completion_tokens"},
		{"max_tokens too large", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"max_tokens":1000000}`, "max_tokens"},
		{"max_tokens not an integer", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"max_tokens":1.5}`, "max_tokens"},
		{"bad role", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"},{"role":"wizard","content":"x"}]}`, "messages[1].role"},
		{"no messages", `{"model":"tiny-model","messages":[]}`, "messages"},
		{"messages not an array", `{"model":"tiny-model","messages":"hi"}`, "messages"},
		{"image part", `{"model":"tiny-model","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}`, "messages[0].content[0].type"},
		{"stop wrong type", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"stop":5}`, "stop"},
		{"empty stop string", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"stop":""}`, "stop"},
		{"too many stops", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"stop":["1","2","3","4","5","6","7","8","9"]}`, "stop"},
		{"stream wrong type", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"stream":"yes"}`, "stream"},
		{"n above eight", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"n":9}`, "n"},
		{"json_schema without schema", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_schema","json_schema":{"name":"x"}}}`, "response_format.json_schema.schema"},
		{"empty json_schema", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_schema","json_schema":{"schema":{}}}}`, "response_format.json_schema.schema"},
		{"unknown response_format", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"yaml"}}`, "response_format.type"},
		// Red team round 17, HTTP L1 and L2: compiled at the edge, not queued;
		// a json_schema beside another type is not dropped unread.
		{"uncompilable json_schema type", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_schema","json_schema":{"schema":{"type":"nosuch"}}}}`, "response_format.json_schema.schema"},
		{"uncompilable json_schema pattern", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_schema","json_schema":{"schema":{"type":"string","pattern":"(("}}}}`, "response_format.json_schema.schema"},
		{"stream_options without stream", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}}`, "stream_options"},
		{"json_schema beside type text", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"text","json_schema":{"schema":{"type":"nosuch"}}}}`, "response_format.json_schema"},
		{"no model", `{"messages":[{"role":"user","content":"hi"}]}`, "model"},
		{"model with spaces", `{"model":"tiny model","messages":[{"role":"user","content":"hi"}]}`, "model"},
		{"tools", `{"model":"tiny-model","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}]}`, "tools[0].function"},
		{"not json", `{"model":`, ""},
		{"not an object", `[1,2]`, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp := postJSON(t, srv.URL+"/v1/chat/completions", c.body)
			e := expectError(t, resp, http.StatusBadRequest, c.param, "")
			if e.Error.Type != "invalid_request_error" {
				t.Fatalf("type %q", e.Error.Type)
			}
		})
	}
	if got := value(observed(g).Submitted.WithLabelValues(endpointChat)); got != 0 {
		t.Fatalf("%v invalid jobs were submitted", got)
	}
}

func TestQueueFullIs429(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{JobsMaxMsgs: 1})
	tb.registerWorker(t, "w1", schemas.WorkerReady, testModel)
	_, srv := newTestGateway(t, tb, nil)

	// Fill the queue; nobody consumes it.
	p, err := bus.NewClient(tb.nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := p.Submit(ctx, &schemas.JobRequest{Model: testModel, Prompt: "fill"}); err != nil {
		t.Fatal(err)
	}

	for _, stream := range []bool{false, true} {
		resp := postJSON(t, srv.URL+"/v1/chat/completions", chatBody(stream, nil))
		expectError(t, resp, http.StatusTooManyRequests, "", "queue_full")
		if ra, err := strconv.Atoi(resp.Header.Get("Retry-After")); err != nil || ra < 1 {
			t.Fatalf("Retry-After %q", resp.Header.Get("Retry-After"))
		}
	}
}

func TestNoWorkerForModel(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	_, srv := newTestGateway(t, tb, nil)

	// Nobody registered and nothing announced: the whole fleet is down, an outage,
	// not a model that does not exist (producers queue then): 503, retried.
	expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, nil)), http.StatusServiceUnavailable, "model", "model_not_available")

	// Only a draining worker has the model, and a ready one has another.
	tb.registerWorker(t, "w-drain", schemas.WorkerDraining, testModel)
	tb.registerWorker(t, "w-other", schemas.WorkerReady, "other-model")
	_, srv2 := newTestGateway(t, tb, nil) // a fresh registry cache
	expectError(t, postJSON(t, srv2.URL+"/v1/chat/completions", chatBody(true, nil)), http.StatusServiceUnavailable, "model", "model_not_available")
}

func TestExpiredJobIs504(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Status: schemas.StatusExpired, ErrCode: "deadline_exceeded"})
	_, srv := newTestGateway(t, tb, nil)
	for _, stream := range []bool{false, true} {
		expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(stream, nil)), http.StatusGatewayTimeout, "", "deadline_exceeded")
	}
}

// When the fleet does not answer by the deadline, the gateway answers 504 itself
// and cancels the job.
func TestRequestTimeoutIs504AndCancels(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	fw := startFakeWorker(t, tb, fakeworker.Plan{Hang: true})
	g, srv := newTestGateway(t, tb, func(c *Config) { c.RequestTimeout = 300 * time.Millisecond })
	g.grace = 100 * time.Millisecond
	cancels, err := tb.nc.SubscribeSync(subjects.CancelAll)
	if err != nil {
		t.Fatal(err)
	}
	_ = tb.nc.Flush()

	start := time.Now()
	expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, nil)), http.StatusGatewayTimeout, "", "deadline_exceeded")
	job := fw.nextJob(t)
	if job.Deadline == nil || job.Deadline.Sub(*job.CreatedAt) != 300*time.Millisecond {
		t.Fatalf("deadline %v created %v", job.Deadline, job.CreatedAt)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("took %v", el)
	}
	msg, err := cancels.NextMsg(5 * time.Second)
	if err != nil || msg.Subject != subjects.Cancel(job.Tenant, job.ID) {
		t.Fatalf("cancel: %v %v", msg, err)
	}
}

func TestFailedJobIs500(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Status: schemas.StatusFailed, ErrCode: "generation_failed"})
	_, srv := newTestGateway(t, tb, nil)
	e := expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, nil)), http.StatusInternalServerError, "", "generation_failed")
	if e.Error.Type != "server_error" {
		t.Fatalf("type %q", e.Error.Type)
	}
}

// A job that fails after streaming began ends with an error event.
func TestStreamFailureMidway(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: []string{"partial"}, Status: schemas.StatusFailed, ErrCode: "runtime_crashed"})
	_, srv := newTestGateway(t, tb, nil)
	events := readSSE(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(true, nil)))
	last := events[len(events)-1]
	var e openAIError
	if err := json.Unmarshal([]byte(last), &e); err != nil || e.Error.Code == nil || *e.Error.Code != "runtime_crashed" {
		t.Fatalf("last event %q: %v", last, err)
	}
}

func TestParamMapping(t *testing.T) {
	t.Parallel()
	m := paramMap{maxTokens: "max_completion_tokens", stopString: true, user: true}
	for path, want := range map[string]string{
		"$.temperature":         "temperature",
		"$.messages[2].content": "messages[2].content",
		"$.max_tokens":          "max_completion_tokens",
		"$.stop[0]":             "stop",
		"$.json_schema":         "response_format.json_schema.schema",
		"$.metadata.user":       "user",
		"$":                     "",
	} {
		if got, ok := m.param(path); !ok || got != want {
			t.Errorf("%s -> %q %v, want %q", path, got, ok, want)
		}
	}
	for _, path := range []string{"$.id", "$.reply_to", "$.deadline", "$.priority"} {
		if _, ok := m.param(path); ok {
			t.Errorf("%s is not the client's field", path)
		}
	}
	// A job broken only in gateway-owned fields is the gateway's fault.
	e := fromValidation(&schemas.ValidationError{Violations: []schemas.Violation{{Path: "$.reply_to", Reason: "bad"}}}, m)
	if e.Status != http.StatusInternalServerError {
		t.Fatalf("status %d", e.Status)
	}
}

// streamedText concatenates the deltas of an SSE chat stream.
func streamedText(t *testing.T, events []string) (string, *openAIError) {
	t.Helper()
	var text strings.Builder
	for _, ev := range events {
		if ev == "[DONE]" {
			continue
		}
		var e openAIError
		if json.Unmarshal([]byte(ev), &e) == nil && e.Error.Code != nil {
			return text.String(), &e
		}
		var chunk struct {
			Choices []struct {
				Delta struct {
					Content string `json:"content"`
				} `json:"delta"`
			} `json:"choices"`
		}
		if err := json.Unmarshal([]byte(ev), &chunk); err != nil {
			t.Fatalf("chunk %q: %v", ev, err)
		}
		for _, c := range chunk.Choices {
			text.WriteString(c.Delta.Content)
		}
	}
	return text.String(), nil
}

// An attempt that had to start over regenerates what the client already has; the
// client sees every byte once, and no empty chunk for what the stream swallowed.
// Mutations caught: bus.JobStream handing over a regenerated prefix (the client
// gets "Once upon Once upon a time"); jobCall.delta sending empty deltas (nine
// events, not seven).
func TestStreamRestartedAttemptSendsNothingTwice(t *testing.T) {
	t.Parallel()
	eachRetry(t, []string{"Once ", "upon ", "a ", "time"}, func(t *testing.T, url string) {
		events := readSSE(t, postJSON(t, url+"/v1/chat/completions", chatBody(true, nil)))
		text, e := streamedText(t, events)
		if e != nil || text != "Once upon a time" {
			t.Fatalf("text %q error %+v", text, e)
		}
		if len(events) != 7 { // role, four deltas, finish, [DONE]
			t.Fatalf("%d events: %q", len(events), events)
		}
	})
}

// When the restarted attempt generates different text, the client cannot be
// given a coherent stream: it gets an error naming the job, not a stitched text.
func TestStreamRestartedAttemptThatDivergesEndsWithError(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: []string{"Once ", "upon ", "a ", "time"}, Crash: 2, StartOver: true},
		fakeworker.Plan{Tokens: []string{"Long ", "ago"}})
	_, srv := newTestGateway(t, tb, nil)
	text, e := streamedText(t, readSSE(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(true, nil))))
	if e == nil || *e.Error.Code != "stream_diverged" || text != "Once upon " {
		t.Fatalf("text %q error %+v", text, e)
	}
}
