package gateway

import (
	"net/http"
	"sort"
	"testing"

	"github.com/mlx-serving/mlx-serving/bus"
)

// n > 1: n jobs (seeds seed..seed+n-1), choices indexed 0..n-1, the prompt counted
// once and the completions summed; stream with n > 1 and n beyond 8 are refused.
// Mutation caught: mergeChoices returning bodies[0] (one choice, usage of one).
func TestChoicesRunOneJobEach(t *testing.T) {
	t.Parallel()
	tb := startBus(t, bus.ProvisionOptions{})
	fw := startFakeWorker(t, tb, script{tokens: helloTokens, prompt: 5})
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
	if len(body.Choices) != 3 || body.Usage != (usage{5, 12, 17}) {
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
	if len(text.Choices) != 2 || text.Choices[1].Index != 1 || text.Choices[1].Text != "Hello, world!" || text.Usage != (usage{5, 8, 13}) {
		t.Fatalf("completions body %+v", text)
	}

	expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(true, map[string]any{"n": 2})),
		http.StatusBadRequest, "n", "unsupported_parameter")
	expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, map[string]any{"n": 9})),
		http.StatusBadRequest, "n", "invalid_value")
}
