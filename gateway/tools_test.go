package gateway

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/schemas"
)

var weatherTool = map[string]any{"type": "function", "function": map[string]any{
	"name": "get_weather", "description": "Weather for a city.",
	"parameters": map[string]any{"type": "object", "properties": map[string]any{"city": map[string]any{"type": "string"}},
		"required": []string{"city"}},
}}

// callTokens is a call as the runtime's grammar writes it, cut into tokens that
// split the marker, the name and the arguments.
var callTokens = []string{"<tool", "_call>\n{\"na", "me\": \"get_we", "ather\", \"argu", "ments\": {\"ci",
	"ty\":\"Pa}ris \\\"", "</tool_call>\"}", "}\n</tool", "_call>"}

const callArgs = `{"city":"Pa}ris \"</tool_call>"}`

type parsed struct {
	content string
	calls   []chatToolCall
	deltas  int
}

// parseStream feeds pieces one by one, as a stream does, and assembles the deltas
// as a client would.
func parseStream(pieces []string) parsed {
	var p toolParser
	var out parsed
	add := func(content string, ds []toolCallDelta) {
		out.content += content
		for _, d := range ds {
			out.deltas++
			for len(out.calls) <= d.Index {
				out.calls = append(out.calls, chatToolCall{})
			}
			c := &out.calls[d.Index]
			if d.ID != "" {
				c.ID, c.Type, c.Function.Name = d.ID, d.Type, d.Function.Name
			}
			c.Function.Arguments += d.Function.Arguments
		}
	}
	for _, s := range pieces {
		add(p.feed(s))
	}
	add(p.flush())
	return out
}

func runes(s string) []string {
	var out []string
	for _, r := range s {
		out = append(out, string(r))
	}
	return out
}

// The parser reads the grammar's layout into content and calls, the same whether
// the text comes whole, in tokens or rune by rune.
// Mutation caught: callScan.scan ignoring inStr (the "}" inside the city string
// ends the arguments early: arguments `{"city":"Pa}`).
func TestToolParser(t *testing.T) {
	t.Parallel()
	type call struct{ name, args string }
	cases := []struct {
		name    string
		text    string
		content string
		calls   []call
	}{
		{"one call", strings.Join(callTokens, ""), "", []call{{"get_weather", callArgs}}},
		{"parallel calls", "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\":[1,{\"y\":2}]}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>",
			"", []call{{"a", `{"x":[1,{"y":2}]}`}, {"b", `{}`}}},
		{"plain text", "Hello, <world> and <tool", "Hello, <world> and <tool", nil},
		{"whitespace only text", "\n  ", "\n  ", nil},
		{"text around a call", "Sure.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"k\":\"ü\"}}\n</tool_call>\n",
			"Sure.", []call{{"a", `{"k":"ü"}`}}},
		{"other key order", "<tool_call>{\"arguments\": {\"k\": 1}, \"name\": \"a\"}</tool_call>", "", []call{{"a", `{"k": 1}`}}},
		{"not a call", "<tool_call>oops</tool_call>", "<tool_call>oops</tool_call>", nil},
		{"cut before the name", "<tool_call>\n{\"na", "<tool_call>\n{\"na", nil},
		{"cut in the arguments", "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"k\":\"v", "", []call{{"a", `{"k":"v`}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var want []call
			for _, splits := range [][]string{{c.text}, runes(c.text), callTokens} {
				if splits[0] == callTokens[0] && c.name != "one call" {
					continue
				}
				got := parseStream(splits)
				if got.content != c.content {
					t.Fatalf("%d pieces: content %q, want %q", len(splits), got.content, c.content)
				}
				var calls []call
				ids := map[string]bool{}
				for _, tc := range got.calls {
					if !strings.HasPrefix(tc.ID, "call_") || len(tc.ID) != 29 || ids[tc.ID] || tc.Type != "function" {
						t.Fatalf("call id %q type %q", tc.ID, tc.Type)
					}
					ids[tc.ID] = true
					calls = append(calls, call{tc.Function.Name, tc.Function.Arguments})
				}
				want = c.calls
				if !reflect.DeepEqual(calls, want) {
					t.Fatalf("%d pieces: calls %q, want %q", len(splits), calls, want)
				}
			}
			content, calls := parseToolText(c.text)
			wantNull := len(c.calls) > 0 && c.content == ""
			if len(calls) != len(c.calls) || (content == nil) != wantNull || (content != nil && *content != c.content) {
				t.Fatalf("whole: content %v, %d calls", content, len(calls))
			}
		})
	}
	// Arguments stream as they grow: more than one delta for a call cut in tokens.
	if got := parseStream(callTokens); got.deltas < 3 {
		t.Fatalf("%d deltas: arguments did not stream", got.deltas)
	}
}

// A request with tools carries them to the job, and an answer that is a call comes
// back in OpenAI's shape: content null, tool_calls, finish_reason tool_calls.
// Mutation caught: chatRequest.format not switching to the calls format (content
// holds the raw <tool_call> text, finish_reason stop).
func TestToolCallsWhole(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	fw := startFakeWorker(t, tb, fakeworker.Plan{Tokens: callTokens, Prompt: 30})
	_, srv := newTestGateway(t, tb, nil)

	resp := postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, map[string]any{
		"tools":               []any{weatherTool},
		"tool_choice":         map[string]any{"type": "function", "function": map[string]any{"name": "get_weather"}},
		"parallel_tool_calls": false,
	}))
	if resp.StatusCode != http.StatusOK {
		expectError(t, resp, http.StatusOK, "", "")
	}
	var body map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	choice := body["choices"].([]any)[0].(map[string]any)
	msg := choice["message"].(map[string]any)
	if choice["finish_reason"] != "tool_calls" || msg["content"] != nil {
		t.Fatalf("choice %v", choice)
	}
	calls := msg["tool_calls"].([]any)
	c := calls[0].(map[string]any)
	fn := c["function"].(map[string]any)
	if len(calls) != 1 || c["type"] != "function" || !strings.HasPrefix(c["id"].(string), "call_") ||
		fn["name"] != "get_weather" || fn["arguments"] != callArgs {
		t.Fatalf("tool_calls %v", calls)
	}
	job := fw.nextJob(t)
	if len(job.Tools) != 1 || job.Tools[0].Function.Name != "get_weather" || job.Tools[0].Function.Parameters["type"] != "object" ||
		job.ToolChoice == nil || job.ToolChoice.Function != "get_weather" || !ptrIs(job.ParallelToolCalls, false) {
		t.Fatalf("job tools %+v choice %+v parallel %v", job.Tools, job.ToolChoice, job.ParallelToolCalls)
	}
}

type toolChunk struct {
	Choices []struct {
		Index int `json:"index"`
		Delta struct {
			Content   *string         `json:"content"`
			ToolCalls []toolCallDelta `json:"tool_calls"`
		} `json:"delta"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
}

// Streamed, a call comes as OpenAI's deltas: the first names it (index, id, type,
// name), the others append to its arguments; the last chunk says tool_calls. With
// n=2 each choice has its own calls.
// Mutation caught: chatFormat.choice not giving each choice its own parser (choice
// 1's deltas continue choice 0's: index 1, a second call).
func TestToolCallsStreamed(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: callTokens, Prompt: 30})
	_, srv := newTestGateway(t, tb, nil)

	for _, n := range []int{1, 2} {
		events := readSSE(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(true, map[string]any{
			"tools": []any{weatherTool}, "tool_choice": "required", "n": n,
		})))
		type acc struct {
			id, name, args, finish string
			heads, content         int
		}
		got := make([]acc, n)
		for _, e := range events[:len(events)-1] {
			var c toolChunk
			if err := json.Unmarshal([]byte(e), &c); err != nil {
				t.Fatal(err)
			}
			for _, ch := range c.Choices {
				a := &got[ch.Index]
				if ch.Delta.Content != nil && *ch.Delta.Content != "" {
					a.content++
				}
				for _, d := range ch.Delta.ToolCalls {
					if d.Index != 0 {
						t.Fatalf("n=%d: call index %d: %s", n, d.Index, e)
					}
					if d.ID != "" {
						a.heads++
						a.id, a.name = d.ID, d.Function.Name
						if d.Type != "function" {
							t.Fatalf("head without type: %s", e)
						}
					}
					a.args += d.Function.Arguments
				}
				if ch.FinishReason != nil {
					a.finish = *ch.FinishReason
				}
			}
		}
		for i, a := range got {
			if a.heads != 1 || a.content != 0 || a.name != "get_weather" || a.args != callArgs || a.finish != "tool_calls" ||
				!strings.HasPrefix(a.id, "call_") {
				t.Fatalf("n=%d choice %d: %+v\n%s", n, i, a, strings.Join(events, "\n"))
			}
		}
	}
}

// tool_choice none reads no calls: the text is content as it came.
func TestToolChoiceNoneIsText(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: callTokens, Finish: "length"})
	_, srv := newTestGateway(t, tb, nil)
	body := decode[chatCompletion](t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, map[string]any{
		"tools": []any{weatherTool}, "tool_choice": "none",
	})).Body)
	ch := body.Choices[0]
	if ch.Message.Content == nil || *ch.Message.Content != strings.Join(callTokens, "") || ch.Message.ToolCalls != nil || ch.FinishReason != "length" {
		t.Fatalf("choice %+v", ch)
	}
}

// A call cut by max_tokens: finish_reason length, the call with what it has.
func TestToolCallCutIsLength(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: callTokens[:6], Finish: "length"})
	_, srv := newTestGateway(t, tb, nil)
	body := decode[chatCompletion](t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, map[string]any{
		"tools": []any{weatherTool}, "tool_choice": "required",
	})).Body)
	ch := body.Choices[0]
	if ch.FinishReason != "length" || len(ch.Message.ToolCalls) != 1 || ch.Message.ToolCalls[0].Function.Arguments != `{"city":"Pa}ris \"` {
		t.Fatalf("choice %+v", ch)
	}
}

// A conversation that called a tool and got its answer travels to the job.
func TestToolRoundTripMessages(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	fw := startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens})
	_, srv := newTestGateway(t, tb, nil)
	resp := postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, map[string]any{
		"tools": []any{weatherTool},
		"messages": []any{
			map[string]any{"role": "user", "content": "Weather in Paris?"},
			map[string]any{"role": "assistant", "content": nil, "tool_calls": []any{map[string]any{
				"id": "call_1", "type": "function", "function": map[string]any{"name": "get_weather", "arguments": `{"city":"Paris"}`}}}},
			map[string]any{"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
		},
	}))
	if resp.StatusCode != http.StatusOK {
		expectError(t, resp, http.StatusOK, "", "")
	}
	job := fw.nextJob(t)
	want := []schemas.Message{
		{Role: "user", Content: "Weather in Paris?"},
		{Role: "assistant", ToolCalls: []schemas.ToolCall{{ID: "call_1", Type: "function",
			Function: schemas.ToolCallFunction{Name: "get_weather", Arguments: `{"city":"Paris"}`}}}},
		{Role: "tool", Content: "sunny", ToolCallID: "call_1"},
	}
	if !reflect.DeepEqual(job.Messages, want) {
		t.Fatalf("messages %+v", job.Messages)
	}
}

// Bad tools are refused at the edge, naming the field.
func TestToolsRefused(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	tb.registerWorker(t, "w1", schemas.WorkerReady, testModel)
	_, srv := newTestGateway(t, tb, nil)
	fn := func(f map[string]any) []any { return []any{map[string]any{"type": "function", "function": f}} }
	user := []any{map[string]any{"role": "user", "content": "hi"}}
	cases := []struct {
		name  string
		extra map[string]any
		param string
	}{
		{"type", map[string]any{"tools": []any{map[string]any{"type": "retrieval", "function": map[string]any{"name": "f"}}}}, "tools[0].type"},
		{"no function", map[string]any{"tools": []any{map[string]any{"type": "function"}}}, "tools[0].function"},
		{"name with space", map[string]any{"tools": fn(map[string]any{"name": "get weather"})}, "tools[0].function.name"},
		{"duplicate names", map[string]any{"tools": append(fn(map[string]any{"name": "f"}), fn(map[string]any{"name": "f"})...)}, "tools[1].function.name"},
		{"parameters not an object", map[string]any{"tools": fn(map[string]any{"name": "f", "parameters": "x"})}, "tools[0].function.parameters"},
		{"parameters of a string", map[string]any{"tools": fn(map[string]any{"name": "f", "parameters": map[string]any{"type": "string"}})}, "tools[0].function.parameters.type"},
		{"invalid parameters schema", map[string]any{"tools": fn(map[string]any{"name": "f", "parameters": map[string]any{
			"type": "object", "properties": map[string]any{"a": map[string]any{"type": "nonsense"}}}})}, "tools[0].function.parameters"},
		{"unknown mode", map[string]any{"tools": fn(map[string]any{"name": "f"}), "tool_choice": "always"}, "tool_choice"},
		{"unknown named function", map[string]any{"tools": fn(map[string]any{"name": "f"}),
			"tool_choice": map[string]any{"type": "function", "function": map[string]any{"name": "g"}}}, "tool_choice.function.name"},
		{"required without tools", map[string]any{"tool_choice": "required"}, "tool_choice"},
		{"tool message without id", map[string]any{"messages": append(user, map[string]any{"role": "tool", "content": "x"})}, "messages[1].tool_call_id"},
		{"calls on a user message", map[string]any{"messages": []any{map[string]any{"role": "user", "content": "x", "tool_calls": []any{
			map[string]any{"id": "c", "type": "function", "function": map[string]any{"name": "f", "arguments": "{}"}}}}}}, "messages[0].tool_calls"},
		{"unknown key in a tool", map[string]any{"tools": fn(map[string]any{"name": "f", "returns": "x"})}, "tools[0].function.returns"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, c.extra)), http.StatusBadRequest, c.param, "")
		})
	}
}

// Logprobs with calls: every token's entry reaches the client once, streamed (the
// entries of text held back go with the next chunk) or whole.
// Mutation caught: chatFormat.delta not keeping lp.entries while the parser holds
// text back (the entries of the split marker are lost).
func TestToolCallsLogprobs(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: callTokens, Prompt: 30})
	_, srv := newTestGateway(t, tb, nil)
	want := strings.Join(callTokens, "")
	tokensOf := func(raw json.RawMessage) string {
		var lp struct {
			Content []schemas.TokenLogprob `json:"content"`
		}
		_ = json.Unmarshal(raw, &lp)
		var b strings.Builder
		for _, e := range lp.Content {
			b.WriteString(e.Token)
		}
		return b.String()
	}
	events := readSSE(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(true, map[string]any{
		"tools": []any{weatherTool}, "tool_choice": "required", "logprobs": true, "top_logprobs": 1,
	})))
	var got strings.Builder
	for _, e := range events[:len(events)-1] {
		var c struct {
			Choices []struct {
				Logprobs json.RawMessage `json:"logprobs"`
			} `json:"choices"`
		}
		if err := json.Unmarshal([]byte(e), &c); err != nil {
			t.Fatal(err)
		}
		for _, ch := range c.Choices {
			got.WriteString(tokensOf(ch.Logprobs))
		}
	}
	if got.String() != want {
		t.Fatalf("streamed entries spell %q, want %q", got.String(), want)
	}
	body := decode[chatCompletion](t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, map[string]any{
		"tools": []any{weatherTool}, "tool_choice": "required", "logprobs": true,
	})).Body)
	if s := tokensOf(body.Choices[0].Logprobs); s != want || len(body.Choices[0].Message.ToolCalls) != 1 {
		t.Fatalf("whole entries spell %q; choice %+v", s, body.Choices[0])
	}
}

// A tenant's prompt limit counts the tools, which are rendered into the prompt, and
// the calls carried by history.
// Mutation caught: admit counting only the messages' contents (the tools pass).
func TestToolsCountTowardPromptLimit(t *testing.T) {
	t.Parallel()
	_, url, _ := limitedGateway(t, TenantLimits{MaxPromptChars: 60})
	long := map[string]any{"type": "function", "function": map[string]any{"name": "f", "description": strings.Repeat("d", 60)}}
	short := map[string]any{"type": "function", "function": map[string]any{"name": "f"}}
	user := map[string]any{"role": "user", "content": "hi"}
	resp := postJSON(t, url+"/v1/chat/completions", chatBody(false, map[string]any{"messages": []any{user}, "tools": []any{long}}),
		"Authorization", "Bearer tok-a")
	expectError(t, resp, http.StatusBadRequest, "tools", codePromptTooLong)
	call := map[string]any{"role": "assistant", "tool_calls": []any{map[string]any{"id": "c", "type": "function",
		"function": map[string]any{"name": "f", "arguments": `{"x":"` + strings.Repeat("a", 60) + `"}`}}}}
	resp = postJSON(t, url+"/v1/chat/completions", chatBody(false, map[string]any{"messages": []any{user, call}, "tools": []any{short}}),
		"Authorization", "Bearer tok-a")
	expectError(t, resp, http.StatusBadRequest, "messages", codePromptTooLong)
}

// A parameters schema that refers outside itself is refused before it is compiled:
// compiling would read the file (or fetch the URL) it names. Local references work.
// Mutation caught: toolParameters without localRefsOnly (the file schema compiles:
// no error).
func TestToolParametersStayLocal(t *testing.T) {
	t.Parallel()
	file := filepath.Join(t.TempDir(), "s.json")
	if err := os.WriteFile(file, []byte(`{"type":"string"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, schema := range []string{
		`{"type":"object","properties":{"a":{"$ref":"file://` + file + `"}}}`,
		`{"$id":"file://` + file + `","type":"object","properties":{"a":{"$ref":"#"}}}`,
		`{"type":"object","properties":{"a":{"$ref":"http://127.0.0.1:1/s.json"}}}`,
	} {
		if _, aerr := toolParameters(json.RawMessage(schema), "p"); aerr == nil || aerr.Param != "p" {
			t.Fatalf("%s: accepted (%v)", schema, aerr)
		}
	}
	local := `{"type":"object","definitions":{"c":{"type":"string"}},"properties":{"a":{"$ref":"#/definitions/c"},` +
		`"b":{"enum":[{"$ref":"file:///x"}]}}}`
	if _, aerr := toolParameters(json.RawMessage(local), "p"); aerr != nil {
		t.Fatalf("local refs refused: %v", aerr)
	}
}

// However the text is cut into deltas, the parser reads the same content and calls
// as from the whole text, and never panics.
func FuzzToolParser(f *testing.F) {
	f.Add(strings.Join(callTokens, ""), 7)
	f.Add("Sure.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"k\":[1,\"}\"]}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": 3}\n</tool_call>", 40)
	f.Add("<tool_call>{\"arguments\": {}, \"name\": \"x\"}</tool_call> tail <tool_c", 3)
	f.Add("plain <tool_call>broken", 9)
	f.Fuzz(func(t *testing.T, text string, cut int) {
		rs := runes(text)
		if len(rs) == 0 || !utf8.ValidString(text) {
			return // deltas are JSON strings: valid UTF-8
		}
		cut = ((cut % len(rs)) + len(rs)) % len(rs)
		whole := parseStream([]string{text})
		split := parseStream([]string{strings.Join(rs[:cut], ""), strings.Join(rs[cut:], "")})
		bytewise := parseStream(rs)
		for _, got := range []parsed{split, bytewise} {
			if got.content != whole.content || len(got.calls) != len(whole.calls) {
				t.Fatalf("cut %d: content %q calls %d; whole: %q calls %d", cut, got.content, len(got.calls), whole.content, len(whole.calls))
			}
			for i := range got.calls {
				a, b := got.calls[i].Function, whole.calls[i].Function
				if a != b {
					t.Fatalf("cut %d: call %d %+v, whole %+v", cut, i, a, b)
				}
			}
		}
	})
}
