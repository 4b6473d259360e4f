package gateway

import (
	"encoding/json"
	"net/http"
	"reflect"
	"sort"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
)

// n > 1: n jobs (seeds seed..seed+n-1), choices indexed 0..n-1, the prompt counted
// once and the completions summed; n beyond 8 is refused.
// Mutation caught: mergeChoices returning bodies[0] (one choice, usage of one).
func TestChoicesRunOneJobEach(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	fw := startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens, Prompt: 5})
	_, srv := newTestGateway(t, tb, nil)

	resp := postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, map[string]any{"n": 3, "seed": 7}))
	if resp.StatusCode != http.StatusOK {
		expectError(t, resp, 200, "", "")
	}
	body := decode[struct {
		Choices []struct {
			Index   int `json:"index"`
			Message struct {
				Content string `json:"content"`
			} `json:"message"`
		} `json:"choices"`
		Usage usage `json:"usage"`
	}](t, resp.Body)
	if len(body.Choices) != 3 || body.Usage != (usage{5, 12, 17, promptTokensDetails{}}) {
		t.Fatalf("body %+v", body)
	}
	for i, c := range body.Choices {
		if c.Index != i || c.Message.Content != "Hello, world!" {
			t.Fatalf("choice %d: %+v", i, c)
		}
	}
	var seeds []int
	for range 3 {
		seeds = append(seeds, int(*fw.nextJob(t).Seed))
	}
	sort.Ints(seeds)
	if seeds[0] != 7 || seeds[1] != 8 || seeds[2] != 9 {
		t.Fatalf("seeds %v", seeds)
	}

	text := decode[struct {
		Choices []struct {
			Index int    `json:"index"`
			Text  string `json:"text"`
		} `json:"choices"`
		Usage usage `json:"usage"`
	}](t, postJSON(t, srv.URL+"/v1/completions", map[string]any{"model": testModel, "prompt": "hi", "n": 2}).Body)
	if len(text.Choices) != 2 || text.Choices[1].Index != 1 || text.Choices[1].Text != "Hello, world!" || text.Usage != (usage{5, 8, 13, promptTokensDetails{}}) {
		t.Fatalf("completions body %+v", text)
	}

	expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, map[string]any{"n": 9})),
		http.StatusBadRequest, "n", "invalid_value")
}

// Streamed n > 1: every chunk names its choice, each choice gets its text and its
// finish, one usage chunk sums them and one [DONE] ends the stream.
// Mutation caught: withIndex returning v unchanged (every chunk says index 0).
func TestChoicesStream(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens, Prompt: 5})
	_, srv := newTestGateway(t, tb, nil)
	events := readSSE(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(true, map[string]any{
		"n": 2, "stream_options": map[string]any{"include_usage": true}, "logprobs": true})))
	if events[len(events)-1] != "[DONE]" {
		t.Fatalf("events %q", events)
	}
	texts, finishes, roles := map[int]string{}, map[int]string{}, map[int]int{}
	entries := map[int]int{}
	var u *usage
	for _, e := range events[:len(events)-1] {
		var c struct {
			Choices []struct {
				Index int `json:"index"`
				Delta struct {
					Role    string  `json:"role"`
					Content *string `json:"content"`
				} `json:"delta"`
				Logprobs     *chatLogprobs `json:"logprobs"`
				FinishReason *string       `json:"finish_reason"`
			} `json:"choices"`
			Usage *usage `json:"usage"`
		}
		if err := json.Unmarshal([]byte(e), &c); err != nil {
			t.Fatal(err)
		}
		if c.Usage != nil {
			u = c.Usage
		}
		for _, ch := range c.Choices {
			if ch.Delta.Role != "" {
				roles[ch.Index]++
			}
			if ch.Delta.Content != nil {
				texts[ch.Index] += *ch.Delta.Content
			}
			if ch.Logprobs != nil {
				entries[ch.Index] += len(ch.Logprobs.Content)
			}
			if ch.FinishReason != nil {
				finishes[ch.Index] = *ch.FinishReason
			}
		}
	}
	want := map[int]string{0: "Hello, world!", 1: "Hello, world!"}
	if !reflect.DeepEqual(texts, want) || !reflect.DeepEqual(finishes, map[int]string{0: "stop", 1: "stop"}) ||
		!reflect.DeepEqual(roles, map[int]int{0: 1, 1: 1}) || !reflect.DeepEqual(entries, map[int]int{0: 4, 1: 4}) {
		t.Fatalf("texts %v finishes %v roles %v entries %v", texts, finishes, roles, entries)
	}
	if u == nil || *u != (usage{5, 8, 13, promptTokensDetails{}}) {
		t.Fatalf("usage %+v", u)
	}
}
