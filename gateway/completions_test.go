package gateway

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
)

func TestCompletionsNonStreaming(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	fw := startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens, Prompt: 3, Cached: 2})
	_, srv := newTestGateway(t, tb, nil)

	resp := postJSON(t, srv.URL+"/v1/completions", map[string]any{"model": testModel, "prompt": "Once upon", "temperature": 0})
	if resp.StatusCode != http.StatusOK {
		expectError(t, resp, 200, "", "")
	}
	body := decode[map[string]any](t, resp.Body)
	if body["object"] != "text_completion" || !strings.HasPrefix(body["id"].(string), "cmpl-") || body["model"] != testModel {
		t.Fatalf("body %v", body)
	}
	ch := body["choices"].([]any)[0].(map[string]any)
	if ch["text"] != "Hello, world!" || ch["finish_reason"] != "stop" || ch["index"] != 0.0 {
		t.Fatalf("choice %v", ch)
	}
	if _, ok := ch["logprobs"]; !ok {
		t.Fatalf("logprobs must be present (null): %v", ch)
	}
	expectUsage(t, body, 3, 4, 2)
	job := fw.nextJob(t)
	if job.Prompt != "Once upon" || job.Messages != nil || job.MaxTokens != 0 || *job.Temperature != 0 {
		t.Fatalf("job %+v", job)
	}
}

func TestCompletionsStreaming(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens, Prompt: 3})
	_, srv := newTestGateway(t, tb, nil)

	events := readSSE(t, postJSON(t, srv.URL+"/v1/completions", map[string]any{
		"model": testModel, "prompt": []string{"Once upon"}, "stream": true, "max_tokens": 8,
		"stream_options": map[string]any{"include_usage": true},
	}))
	if events[len(events)-1] != "[DONE]" {
		t.Fatalf("no [DONE]: %q", events)
	}
	var text strings.Builder
	var finish string
	var got *usage
	for _, e := range events[:len(events)-1] {
		var c testChunk
		if err := json.Unmarshal([]byte(e), &c); err != nil {
			t.Fatal(err)
		}
		if c.Object != "text_completion" || !strings.HasPrefix(c.ID, "cmpl-") {
			t.Fatalf("chunk %s", e)
		}
		if len(c.Choices) == 0 {
			got = c.Usage
			continue
		}
		if c.Choices[0].Text == nil {
			t.Fatalf("chunk without text: %s", e)
		}
		text.WriteString(*c.Choices[0].Text)
		if c.Choices[0].FinishReason != nil {
			finish = *c.Choices[0].FinishReason
		}
	}
	if text.String() != "Hello, world!" || finish != "stop" {
		t.Fatalf("text %q finish %q", text.String(), finish)
	}
	if got == nil || *got != (usage{3, 4, 7, promptTokensDetails{}}) {
		t.Fatalf("usage %+v", got)
	}
}

func TestCompletionsInvalid(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	tb.registerWorker(t, "w1", "ready", testModel)
	_, srv := newTestGateway(t, tb, nil)
	for body, param := range map[string]string{
		`{"model":"tiny-model"}`:                               "prompt",
		`{"model":"tiny-model","prompt":""}`:                   "prompt",
		`{"model":"tiny-model","prompt":[""]}`:                 "prompt[0]",
		`{"model":"tiny-model","prompt":["a","b"]}`:            "prompt",
		`{"model":"tiny-model","prompt":[1,2,3]}`:              "prompt",
		`{"model":"tiny-model","prompt":"a","echo":true}`:      "echo",
		`{"model":"tiny-model","prompt":"a","logprobs":21}`:    "logprobs",
		`{"model":"tiny-model","prompt":"a","temperature":-1}`: "temperature",
	} {
		expectError(t, postJSON(t, srv.URL+"/v1/completions", body), http.StatusBadRequest, param, "")
	}
}
