package gateway

import (
	"encoding/json"
	"net/http"
	"reflect"
	"testing"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/schemas"
)

type chatLogprobs struct {
	Content []struct {
		Token       string  `json:"token"`
		Logprob     float64 `json:"logprob"`
		Bytes       []int   `json:"bytes"`
		TopLogprobs []struct {
			Token   string  `json:"token"`
			Logprob float64 `json:"logprob"`
		} `json:"top_logprobs"`
	} `json:"content"`
}

type textLogprobs struct {
	Tokens        []string             `json:"tokens"`
	TokenLogprobs []float64            `json:"token_logprobs"`
	TopLogprobs   []map[string]float64 `json:"top_logprobs"`
	TextOffset    []int                `json:"text_offset"`
}

// streamedLogprobs is the logprobs of each chunk of an SSE stream that has
// them, in order ([DONE] and chunks without skipped).
func streamedLogprobs[T any](events []string) []T {
	var out []T
	for _, e := range events {
		var c struct {
			Choices []struct {
				Logprobs *T `json:"logprobs"`
			} `json:"choices"`
		}
		if json.Unmarshal([]byte(e), &c) == nil && len(c.Choices) > 0 && c.Choices[0].Logprobs != nil {
			out = append(out, *c.Choices[0].Logprobs)
		}
	}
	return out
}

// add appends the entries of o, one streamed chunk's.
func (l *textLogprobs) add(o textLogprobs) {
	l.Tokens = append(l.Tokens, o.Tokens...)
	l.TokenLogprobs = append(l.TokenLogprobs, o.TokenLogprobs...)
	l.TopLogprobs = append(l.TopLogprobs, o.TopLogprobs...)
	l.TextOffset = append(l.TextOffset, o.TextOffset...)
}

func tokensOf(c chatLogprobs) []string {
	var out []string
	for _, e := range c.Content {
		out = append(out, e.Token)
	}
	return out
}

// Chat: logprobs+top_logprobs reach the job, and every token's entry comes back in
// OpenAI's shape, whole and streamed; without logprobs the field stays null.
// Mutation caught: chatFormat.delta leaving Logprobs null (streamed entries missing);
// whole() ignoring lps.final (the body's content empty).
func TestChatLogprobs(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	fw := startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens, Prompt: 3})
	_, srv := newTestGateway(t, tb, nil)

	resp := postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, map[string]any{"logprobs": true, "top_logprobs": 2}))
	if resp.StatusCode != http.StatusOK {
		expectError(t, resp, 200, "", "")
	}
	body := decode[struct {
		Choices []struct {
			Logprobs chatLogprobs `json:"logprobs"`
		} `json:"choices"`
	}](t, resp.Body)
	if job := fw.nextJob(t); job.Logprobs == nil || *job.Logprobs != 2 {
		t.Fatalf("job logprobs %v", job.Logprobs)
	}
	lp := body.Choices[0].Logprobs
	if !reflect.DeepEqual(tokensOf(lp), helloTokens) || lp.Content[1].Logprob != -0.2 || len(lp.Content[0].TopLogprobs) != 2 ||
		!reflect.DeepEqual(lp.Content[2].Bytes, []int{' ', 'w', 'o', 'r', 'l', 'd'}) {
		t.Fatalf("logprobs %+v", lp)
	}

	events := readSSE(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(true, map[string]any{"logprobs": true})))
	var streamed []string
	for _, l := range streamedLogprobs[chatLogprobs](events) {
		streamed = append(streamed, tokensOf(l)...)
	}
	if !reflect.DeepEqual(streamed, helloTokens) {
		t.Fatalf("streamed entries %q", streamed)
	}
	if job := fw.nextJob(t); job.Logprobs == nil || *job.Logprobs != 0 {
		t.Fatalf("job logprobs %v", job.Logprobs)
	}

	plain := decode[map[string]any](t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, nil)).Body)
	if ch := plain["choices"].([]any)[0].(map[string]any); ch["logprobs"] != nil {
		t.Fatalf("logprobs %v without asking", ch["logprobs"])
	}
	if job := fw.nextJob(t); job.Logprobs != nil {
		t.Fatalf("job logprobs %v without asking", *job.Logprobs)
	}
}

// Completions: logprobs n gives the legacy parallel arrays, text_offset counting
// characters from the answer's start, whole and streamed.
// Mutation caught: textLogprobs not advancing off (every text_offset 0).
func TestCompletionLogprobs(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	fw := startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens, Prompt: 3})
	_, srv := newTestGateway(t, tb, nil)
	want := textLogprobs{Tokens: helloTokens, TokenLogprobs: []float64{-0.1, -0.2, -0.3, -0.4},
		TopLogprobs: []map[string]float64{{"Hello": -0.1}, {",": -0.2}, {" world": -0.3}, {"!": -0.4}}, TextOffset: []int{0, 5, 6, 12}}

	body := decode[struct {
		Choices []struct {
			Logprobs textLogprobs `json:"logprobs"`
		} `json:"choices"`
	}](t, postJSON(t, srv.URL+"/v1/completions", map[string]any{"model": testModel, "prompt": "hi", "logprobs": 1}).Body)
	if !reflect.DeepEqual(body.Choices[0].Logprobs, want) {
		t.Fatalf("logprobs %+v, want %+v", body.Choices[0].Logprobs, want)
	}
	if job := fw.nextJob(t); job.Logprobs == nil || *job.Logprobs != 1 {
		t.Fatalf("job logprobs %v", job.Logprobs)
	}

	events := readSSE(t, postJSON(t, srv.URL+"/v1/completions", map[string]any{"model": testModel, "prompt": "hi", "logprobs": 1, "stream": true}))
	var got textLogprobs
	for _, l := range streamedLogprobs[textLogprobs](events) {
		got.add(l)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("streamed %+v, want %+v", got, want)
	}
}

func TestLogprobsParamsChecked(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	_, srv := newTestGateway(t, tb, nil)
	expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, map[string]any{"top_logprobs": 2})),
		http.StatusBadRequest, "top_logprobs", "invalid_value")
	expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, map[string]any{"logprobs": true, "top_logprobs": 21})),
		http.StatusBadRequest, "top_logprobs", "invalid_value")
	expectError(t, postJSON(t, srv.URL+"/v1/completions", map[string]any{"model": testModel, "prompt": "hi", "logprobs": -1}),
		http.StatusBadRequest, "logprobs", "invalid_value")
}

// A retried job's entries are those of the text the client got, once each and
// with offsets that count that text, whether the retry resumed (the result's
// own copy has only the last attempt's entries) or started over and
// regenerated what was sent (the stream swallows it, entries too).
// Mutations caught: finalLogprobs always taking the result's copy (two entries
// of four when resumed); jobCall.logprobsOf not subtracting the delta's own
// characters (text_offset 5, 6, 12, 13).
func TestCompletionLogprobsAcrossRetries(t *testing.T) {
	t.Parallel()
	want := textLogprobs{Tokens: helloTokens, TokenLogprobs: []float64{-0.1, -0.2, -0.3, -0.4},
		TopLogprobs: []map[string]float64{{"Hello": -0.1}, {",": -0.2}, {" world": -0.3}, {"!": -0.4}}, TextOffset: []int{0, 5, 6, 12}}
	eachRetry(t, helloTokens, func(t *testing.T, url string) {
		req := map[string]any{"model": testModel, "prompt": "hi", "logprobs": 1}
		body := decode[struct {
			Choices []struct {
				Text     string       `json:"text"`
				Logprobs textLogprobs `json:"logprobs"`
			} `json:"choices"`
		}](t, postJSON(t, url+"/v1/completions", req).Body)
		if ch := body.Choices[0]; ch.Text != "Hello, world!" || !reflect.DeepEqual(ch.Logprobs, want) {
			t.Fatalf("whole: %q %+v, want %+v", ch.Text, ch.Logprobs, want)
		}
		req["stream"] = true
		var got textLogprobs
		for _, l := range streamedLogprobs[textLogprobs](readSSE(t, postJSON(t, url+"/v1/completions", req))) {
			got.add(l)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("streamed %+v, want %+v", got, want)
		}
	})
}

// restLogprobs reports the record's entries of the rest only where their
// bytes spell it; anything else gets an empty list, never entries of other
// text.
// Mutation caught: without the spelling check, "entries of other bytes" gets
// them: red (the at != start check is an early exit the spelling check
// backs: removed alone, every case still holds).
func TestRestLogprobsLineUpOrNone(t *testing.T) {
	entry := func(tok string) schemas.TokenLogprob {
		e := schemas.TokenLogprob{Token: tok}
		for _, b := range []byte(tok) {
			e.Bytes = append(e.Bytes, int(b))
		}
		return e
	}
	abc := []schemas.TokenLogprob{entry("ab"), entry("c"), entry("dé")}
	for _, tc := range []struct {
		name, text, rest string
		entries          []schemas.TokenLogprob
		truncated        bool
		want             []string
	}{
		{"the rest after a token", "abcdé", "cdé", abc, false, []string{"c", "dé"}},
		{"the whole text", "abcdé", "abcdé", abc, false, []string{"ab", "c", "dé"}},
		{"a rest inside a token", "abcdé", "bcdé", abc, false, nil},
		{"entries of other bytes", "abxdé", "xdé", abc, false, nil},
		{"fewer entries than text", "abcdéf", "f", abc, false, nil},
		{"a truncated copy", "abcdé", "cdé", abc, true, nil},
	} {
		j := &jobCall{spec: runSpec{logprobs: true}}
		res := &schemas.ResultMsg{Text: tc.text, Logprobs: tc.entries, LogprobsTruncated: tc.truncated}
		l := j.restLogprobs(bus.Event{Result: res, Rest: tc.rest})
		var got []string
		for _, e := range l.entries {
			got = append(got, e.Token)
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: entries %q, want %q", tc.name, got, tc.want)
		}
	}
}
