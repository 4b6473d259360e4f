package gateway

import (
	"io"
	"net/http"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// docField is one request field OpenAI documents, with a value that is not its
// no-op default. Honoured fields say how the job (or the answer) shows them;
// refused ones give the no-op value that is still accepted (nil: JSON null).
type docField struct {
	name    string
	value   any
	job     func(schemas.JobRequest) bool // honoured: the job carries the value
	answer  func(string) bool             // honoured: the answer shows it
	refused bool
	noop    any
}

func refused(name string, value, noop any) docField {
	return docField{name: name, value: value, refused: true, noop: noop}
}

func ptrIs[T comparable](p *T, v T) bool { return p != nil && *p == v }

// sharedDocFields are documented for both endpoints (and the extensions both take).
func sharedDocFields() []docField {
	return []docField{
		{name: "model", value: testModel, job: func(j schemas.JobRequest) bool { return j.Model == testModel }},
		{name: "max_tokens", value: 5, job: func(j schemas.JobRequest) bool { return j.MaxTokens == 5 }},
		{name: "temperature", value: 0.5, job: func(j schemas.JobRequest) bool { return ptrIs(j.Temperature, 0.5) }},
		{name: "top_p", value: 0.5, job: func(j schemas.JobRequest) bool { return ptrIs(j.TopP, 0.5) }},
		{name: "seed", value: 42, job: func(j schemas.JobRequest) bool { return ptrIs(j.Seed, int64(42)) }},
		{name: "stop", value: []string{"zz"}, job: func(j schemas.JobRequest) bool { return reflect.DeepEqual(j.Stop, []string{"zz"}) }},
		{name: "user", value: "u1", job: func(j schemas.JobRequest) bool { return j.Metadata["user"] == "u1" }},
		{name: "stream", value: true, answer: func(a string) bool { return strings.HasSuffix(strings.TrimSpace(a), "data: [DONE]") }},
		{name: "stream_options", value: map[string]any{"include_usage": true},
			answer: func(a string) bool { return strings.Contains(a, `"usage":{"prompt_tokens"`) }},
		{name: "top_k", value: 3, job: func(j schemas.JobRequest) bool { return ptrIs(j.TopK, 3) }},
		{name: "min_p", value: 0.1, job: func(j schemas.JobRequest) bool { return ptrIs(j.MinP, 0.1) }},
		{name: "repetition_penalty", value: 1.2, job: func(j schemas.JobRequest) bool { return ptrIs(j.RepetitionPenalty, 1.2) }},
		{name: "response_format", value: map[string]any{"type": "json_object"},
			job: func(j schemas.JobRequest) bool { return j.JSONSchema["type"] == "object" }},
		{name: "n", value: 2, answer: func(a string) bool { return strings.Contains(a, `"index":1`) }},
		// Mutation caught: dropping job.FrequencyPenalty in samplingParams.apply
		// fails frequency_penalty here (the job lacks it).
		{name: "presence_penalty", value: 0.5, job: func(j schemas.JobRequest) bool { return ptrIs(j.PresencePenalty, 0.5) }},
		{name: "frequency_penalty", value: -0.5, job: func(j schemas.JobRequest) bool { return ptrIs(j.FrequencyPenalty, -0.5) }},
		{name: "logit_bias", value: map[string]int{"50256": -100},
			job: func(j schemas.JobRequest) bool {
				return reflect.DeepEqual(j.LogitBias, map[string]float64{"50256": -100})
			}},
	}
}

// chatDocFields: every field of OpenAI's "Create chat completion" request.
func chatDocFields() []docField {
	return append(sharedDocFields(),
		docField{name: "messages", value: []map[string]any{{"role": "user", "content": "other"}},
			job: func(j schemas.JobRequest) bool { return len(j.Messages) == 1 && j.Messages[0].Content == "other" }},
		docField{name: "max_completion_tokens", value: 7, job: func(j schemas.JobRequest) bool { return j.MaxTokens == 7 }},
		docField{name: "metadata", value: map[string]string{"k": "v"}, job: func(j schemas.JobRequest) bool { return j.Metadata["k"] == "v" }},
		refused("audio", map[string]any{"voice": "alloy", "format": "wav"}, nil),
		refused("function_call", "auto", "none"),
		refused("functions", []map[string]any{{"name": "f"}}, []any{}),
		docField{name: "logprobs", value: true, job: func(j schemas.JobRequest) bool { return ptrIs(j.Logprobs, 0) }},
		refused("modalities", []string{"text", "audio"}, []string{"text"}),
		docField{name: "parallel_tool_calls", value: false, job: func(j schemas.JobRequest) bool { return ptrIs(j.ParallelToolCalls, false) }},
		refused("prediction", map[string]any{"type": "content", "content": "x"}, nil),
		refused("prompt_cache_key", "k", nil),
		refused("reasoning_effort", "low", nil),
		refused("safety_identifier", "s", nil),
		refused("service_tier", "auto", nil),
		refused("store", true, false),
		docField{name: "tool_choice", value: "none", job: func(j schemas.JobRequest) bool { return j.ToolChoice != nil && j.ToolChoice.Mode == "none" }},
		docField{name: "tools", value: []map[string]any{{"type": "function", "function": map[string]any{"name": "f"}}},
			job: func(j schemas.JobRequest) bool { return len(j.Tools) == 1 && j.Tools[0].Function.Name == "f" }},
		docField{name: "top_logprobs", value: 2, job: func(j schemas.JobRequest) bool { return ptrIs(j.Logprobs, 2) }}, // sent with logprobs: true
		refused("verbosity", "low", nil),
		refused("web_search_options", map[string]any{}, nil),
	)
}

// completionDocFields: every field of OpenAI's "Create completion" request.
func completionDocFields() []docField {
	return append(sharedDocFields(),
		docField{name: "prompt", value: "other", job: func(j schemas.JobRequest) bool { return j.Prompt == "other" }},
		refused("best_of", 2, 1),
		refused("echo", true, false),
		docField{name: "logprobs", value: 1, job: func(j schemas.JobRequest) bool { return ptrIs(j.Logprobs, 1) }},
		refused("suffix", "x", ""),
	)
}

// Every documented field is honoured (the job or the answer shows it) or refused
// with 400 naming it, while its no-op value is accepted; anything else, a typo
// or a nested key included, is 400 unknown_parameter naming it; and the gateway
// accepts no field this list does not know.
// Mutation caught: fieldSet.check returning nil at once lets every refused
// field through ("n":2 got a 200, the first one this test sends).
func TestDocumentedFieldsHonouredOrRefused(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	fw := startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens, Prompt: 2})
	_, srv := newTestGateway(t, tb, nil)
	endpoints := []struct {
		path   string
		base   func() map[string]any
		doc    []docField
		fields fieldSet
	}{
		{"/v1/chat/completions", func() map[string]any { return chatBody(false, nil) }, chatDocFields(), chatFields},
		{"/v1/completions", func() map[string]any { return map[string]any{"model": testModel, "prompt": "hi"} }, completionDocFields(), completionFields},
	}
	for _, ep := range endpoints {
		post := func(field string, value any) *http.Response {
			t.Helper()
			body := ep.base()
			body[field] = value
			if field == "stream_options" {
				body["stream"] = true
			}
			if field == "top_logprobs" {
				body["logprobs"] = true
			}
			return postJSON(t, srv.URL+ep.path, body)
		}
		ok := func(name string, resp *http.Response) string {
			t.Helper()
			data, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("%s %s: %d %s", ep.path, name, resp.StatusCode, data)
			}
			return string(data)
		}
		documented := map[string]bool{}
		for _, f := range ep.doc {
			documented[f.name] = true
			if f.refused {
				e := expectError(t, post(f.name, f.value), http.StatusBadRequest, f.name, "unsupported_parameter")
				if e.Error.Type != typeInvalidRequest {
					t.Fatalf("%s %s: type %q", ep.path, f.name, e.Error.Type)
				}
				ok(f.name+" at its no-op value", post(f.name, f.noop))
				fw.nextJob(t)
				continue
			}
			answer := ok(f.name, post(f.name, f.value))
			job := fw.nextJob(t)
			if f.name == "n" {
				fw.nextJob(t) // n=2 is two jobs
			}
			if f.job != nil && !f.job(job) {
				t.Fatalf("%s %s=%v: the job does not carry it: %+v", ep.path, f.name, f.value, job)
			}
			if f.answer != nil && !f.answer(answer) {
				t.Fatalf("%s %s=%v: the answer does not show it: %s", ep.path, f.name, f.value, answer)
			}
		}
		var extra []string
		for name := range ep.fields {
			if !documented[name] {
				extra = append(extra, name)
			}
		}
		sort.Strings(extra)
		if len(extra) > 0 {
			t.Fatalf("%s accepts fields this test does not list: %v", ep.path, extra)
		}

		// Typos, other casings and undocumented fields are unknown, null or not.
		for _, name := range []string{"temprature", "Temperature", "service-tier", "prompt_template"} {
			for _, v := range []any{0.5, nil} {
				expectError(t, post(name, v), http.StatusBadRequest, name, "unknown_parameter")
			}
		}
		// Nested objects are held to their own lists.
		expectError(t, post("stream_options", map[string]any{"include_usage": true, "continuous": true}),
			http.StatusBadRequest, "stream_options.continuous", "unknown_parameter")
		expectError(t, post("response_format", map[string]any{"type": "json_schema",
			"json_schema": map[string]any{"name": "x", "schema": map[string]any{"type": "object"}, "streaming": true}}),
			http.StatusBadRequest, "response_format.json_schema.streaming", "unknown_parameter")
	}

	// Chat messages: a name is dropped by chat templates, so it is refused; the
	// empty extras of an assistant message sent back as history are not.
	msgs := func(extra map[string]any) map[string]any {
		m := map[string]any{"role": "assistant", "content": "hi"}
		for k, v := range extra {
			m[k] = v
		}
		return chatBody(false, map[string]any{"messages": []map[string]any{{"role": "user", "content": "a"}, m}})
	}
	expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", msgs(map[string]any{"name": "bob"})),
		http.StatusBadRequest, "messages[1].name", "unsupported_parameter")
	expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", msgs(map[string]any{"weight": 1})),
		http.StatusBadRequest, "messages[1].weight", "unknown_parameter")
	parts := chatBody(false, map[string]any{"messages": []map[string]any{{"role": "user",
		"content": []map[string]any{{"type": "text", "text": "a"}, {"type": "text", "text": "b", "foo": 1}}}}})
	expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", parts),
		http.StatusBadRequest, "messages[0].content[1].foo", "unknown_parameter")
	resp := postJSON(t, srv.URL+"/v1/chat/completions", msgs(map[string]any{"refusal": nil, "tool_calls": []any{}, "audio": nil}))
	if resp.StatusCode != http.StatusOK {
		expectError(t, resp, http.StatusOK, "", "")
	}
	fw.nextJob(t)
}
