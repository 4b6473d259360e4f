package gateway

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

var helloTokens = []string{"Hello", ",", " world", "!"}

type testChunk struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	Model   string `json:"model"`
	Choices []struct {
		Index int `json:"index"`
		Delta struct {
			Role    *string `json:"role"`
			Content *string `json:"content"`
		} `json:"delta"`
		Text         *string `json:"text"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *usage `json:"usage"`
}

func TestChatStreamSSE(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens, Prompt: 9})
	_, srv := newTestGateway(t, tb, nil)

	resp := postJSON(t, srv.URL+"/v1/chat/completions", chatBody(true, map[string]any{
		"stream_options": map[string]any{"include_usage": true},
	}))
	events := readSSE(t, resp)
	if n := len(events); n < 4 || events[n-1] != "[DONE]" {
		t.Fatalf("stream must end with [DONE]: %q", events)
	}
	chunks := make([]testChunk, 0, len(events)-1)
	raw := make([]map[string]any, 0, len(events)-1)
	for _, e := range events[:len(events)-1] {
		var c testChunk
		if err := json.Unmarshal([]byte(e), &c); err != nil {
			t.Fatalf("chunk %q: %v", e, err)
		}
		chunks = append(chunks, c)
		var m map[string]any
		_ = json.Unmarshal([]byte(e), &m)
		raw = append(raw, m)
	}
	id := chunks[0].ID
	if !strings.HasPrefix(id, "chatcmpl-") {
		t.Fatalf("id %q", id)
	}
	var text strings.Builder
	for i, c := range chunks {
		if c.ID != id || c.Object != "chat.completion.chunk" || c.Model != testModel || c.Created == 0 {
			t.Fatalf("chunk %d header: %+v", i, c)
		}
		if _, ok := raw[i]["usage"]; !ok {
			t.Fatalf("chunk %d lacks usage (null expected with include_usage): %v", i, raw[i])
		}
		last := i == len(chunks)-1
		if last {
			if len(c.Choices) != 0 || c.Usage == nil {
				t.Fatalf("usage chunk: %+v", c)
			}
			if want := (usage{9, 4, 13, promptTokensDetails{}}); *c.Usage != want {
				t.Fatalf("usage %+v, want %+v", *c.Usage, want)
			}
			continue
		}
		if c.Usage != nil || len(c.Choices) != 1 || c.Choices[0].Index != 0 {
			t.Fatalf("chunk %d: %+v", i, c)
		}
		ch := c.Choices[0]
		if i == 0 && (ch.Delta.Role == nil || *ch.Delta.Role != "assistant") {
			t.Fatalf("first chunk has no assistant role: %v", raw[i])
		}
		if i > 0 && ch.Delta.Role != nil {
			t.Fatalf("role repeated in chunk %d", i)
		}
		if i == len(chunks)-2 {
			if ch.FinishReason == nil || *ch.FinishReason != "stop" {
				t.Fatalf("finish chunk: %v", raw[i])
			}
		} else if ch.FinishReason != nil {
			t.Fatalf("finish_reason before the end in chunk %d: %v", i, raw[i])
		}
		if ch.Delta.Content != nil {
			text.WriteString(*ch.Delta.Content)
		}
	}
	if got := text.String(); got != "Hello, world!" {
		t.Fatalf("concatenated deltas %q", got)
	}
}

func TestChatStreamWithoutUsage(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens})
	_, srv := newTestGateway(t, tb, nil)
	events := readSSE(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(true, nil)))
	if events[len(events)-1] != "[DONE]" {
		t.Fatalf("no [DONE]: %q", events)
	}
	for _, e := range events[:len(events)-1] {
		if strings.Contains(e, `"usage"`) {
			t.Fatalf("usage sent without include_usage: %s", e)
		}
	}
}

// A token event lost on the reply subject is made good from the result's text.
func TestChatStreamRepairsGap(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: []string{"a", "b", "c", "d"}, LoseSeq: 3})
	g, srv := newTestGateway(t, tb, nil)
	events := readSSE(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(true, nil)))
	var text strings.Builder
	for _, e := range events[:len(events)-1] {
		var c testChunk
		_ = json.Unmarshal([]byte(e), &c)
		if len(c.Choices) == 1 && c.Choices[0].Delta.Content != nil {
			text.WriteString(*c.Choices[0].Delta.Content)
		}
	}
	if text.String() != "abcd" {
		t.Fatalf("text %q, want abcd", text.String())
	}
	if got := value(observed(g).MissedEvents); got != 1 {
		t.Fatalf("missed events metric %v, want 1", got)
	}
}

func TestChatNonStreaming(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	fw := startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens, Prompt: 12, Cached: 9, Finish: "length"})
	_, srv := newTestGateway(t, tb, nil)

	resp := postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, map[string]any{
		"max_completion_tokens": 4,
		"temperature":           0.5,
		"top_p":                 0.9,
		"seed":                  7,
		"stop":                  "\n\n",
		"user":                  "u-1",
		"frequency_penalty":     0, // its no-op value
		"response_format": map[string]any{"type": "json_schema", "json_schema": map[string]any{
			"name": "x", "schema": map[string]any{"type": "object", "properties": map[string]any{"a": map[string]any{"type": "string"}}}}},
	}))
	if resp.StatusCode != http.StatusOK {
		expectError(t, resp, 200, "", "")
	}
	body := decode[map[string]any](t, resp.Body)
	if body["object"] != "chat.completion" || body["model"] != testModel || !strings.HasPrefix(body["id"].(string), "chatcmpl-") {
		t.Fatalf("body %v", body)
	}
	if c, ok := body["created"].(float64); !ok || c <= 0 {
		t.Fatalf("created %v", body["created"])
	}
	choices := body["choices"].([]any)
	ch := choices[0].(map[string]any)
	msg := ch["message"].(map[string]any)
	if ch["index"].(float64) != 0 || ch["finish_reason"] != "length" || msg["role"] != "assistant" || msg["content"] != "Hello, world!" {
		t.Fatalf("choice %v", ch)
	}
	// Mutation caught: gateway/jobs.go usageOf not copying Usage.CachedTokens (0, not 9).
	expectUsage(t, body, 12, 4, 9)

	job := fw.nextJob(t)
	if job.MaxTokens != 4 || *job.Temperature != 0.5 || *job.TopP != 0.9 || *job.Seed != 7 ||
		!reflect.DeepEqual(job.Stop, []string{"\n\n"}) || job.Metadata["user"] != "u-1" {
		t.Fatalf("job mapping: %+v", job)
	}
	if job.JSONSchema["type"] != "object" || job.JSONSchema["properties"] == nil {
		t.Fatalf("json_schema %v", job.JSONSchema)
	}
	if len(job.Messages) != 2 || job.Messages[0].Role != "system" || job.Messages[1].Content != "Say hello" {
		t.Fatalf("messages %+v", job.Messages)
	}
	if job.Deadline == nil || time.Until(*job.Deadline) < 20*time.Second {
		t.Fatalf("deadline %v should be ~30s from now", job.Deadline)
	}
}

func TestChatRequestMapping(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	fw := startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens})
	_, srv := newTestGateway(t, tb, func(c *Config) { c.DefaultModel = testModel })

	// No model (default applies), developer role, content parts, json_object,
	// stop as an array, max_tokens, metadata with user. (Unknown fields are
	// refused: fields_test.go.)
	resp := postJSON(t, srv.URL+"/v1/chat/completions", `{
		"messages":[{"role":"developer","content":"sys"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
		"response_format":{"type":"json_object"}, "stop":["x","y"], "max_tokens":3, "n":1, "stream":false,
		"metadata":{"trace":"t1"}, "user":"u1"}`)
	if resp.StatusCode != http.StatusOK {
		expectError(t, resp, 200, "", "")
	}
	job := fw.nextJob(t)
	if job.Model != testModel || job.Messages[0].Role != "system" || job.Messages[1].Content != "ab" ||
		!reflect.DeepEqual(job.Stop, []string{"x", "y"}) || job.MaxTokens != 3 || job.JSONSchema["type"] != "object" ||
		!reflect.DeepEqual(job.Metadata, map[string]string{"trace": "t1", "user": "u1"}) {
		t.Fatalf("job %+v", job)
	}
}

// A client that goes away mid-stream has its job cancelled.
func TestChatClientDisconnectCancels(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	fw := startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens, Hang: true, HangAfter: 1})
	g, srv := newTestGateway(t, tb, nil)

	cancels, err := tb.nc.SubscribeSync(subjects.CancelAll)
	if err != nil {
		t.Fatal(err)
	}
	if err := tb.nc.Flush(); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	data, _ := json.Marshal(chatBody(true, nil))
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/chat/completions", strings.NewReader(string(data)))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	// Wait for the first content chunk: the job is running.
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if strings.Contains(sc.Text(), `"Hello"`) {
			break
		}
	}
	job := fw.nextJob(t)
	cancel()

	msg, err := cancels.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatalf("no cancel published: %v", err)
	}
	if msg.Subject != subjects.Cancel(job.Tenant, job.ID) {
		t.Fatalf("cancel on %s, want %s", msg.Subject, subjects.Cancel(job.Tenant, job.ID))
	}
	var c schemas.CancelMsg
	if err := json.Unmarshal(msg.Data, &c); err != nil || c.JobID != job.ID {
		t.Fatalf("cancel message %s: %v", msg.Data, err)
	}
	if err := schemas.Validate(schemas.Cancel, msg.Data); err != nil {
		t.Fatalf("cancel message invalid: %v", err)
	}
	// The gateway counts the disconnect before it publishes the cancel.
	if got := value(observed(g).Disconnects); got != 1 {
		t.Fatalf("disconnects metric %v, want 1", got)
	}
}
