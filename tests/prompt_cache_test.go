package tests

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/gateway"
	"github.com/mlx-serving/mlx-serving/gateway/gatewaybus"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A prompt asked again on the same worker is served from the runtime's prompt
// cache, and the job result says how much of it was: usage.cached_tokens in the
// terminal event and in RESULTS, usage.prompt_tokens_details.cached_tokens at the
// gateway, as OpenAI reports it.
//
// Mutation caught: python/mlx_serving_runtime/engine.py Engine._end reporting
// "cached_tokens": 0 (the second job's result counts no cached tokens; the
// gateway's prompt_tokens_details too).
func TestPromptCacheReportedEndToEnd(t *testing.T) {
	s := newStack(t)
	s.startDispatcher("d1")
	s.startWorker(2)
	ctx := testenv.Context(t, 2*time.Minute)

	prompt := "Alpha: " + strings.Repeat("the stone by the river, ", 40)
	var outs []*schemas.ResultMsg
	for range 2 {
		o, err := s.submit(ctx, tinyJob(prompt, 8), nil)
		if err != nil {
			t.Fatal(err)
		}
		if o.result.Status != schemas.StatusCompleted {
			t.Fatalf("result %+v", o.result)
		}
		outs = append(outs, o.result)
	}
	first, second := outs[0].Usage, outs[1].Usage
	if first.CachedTokens != 0 || first.PromptTokens < 200 {
		t.Fatalf("first ask: usage %+v, want a long prompt and nothing cached", first)
	}
	// All but the one token the runtime always computes.
	if second.PromptTokens != first.PromptTokens || second.CachedTokens != second.PromptTokens-1 {
		t.Fatalf("second ask: usage %+v, want cached_tokens = prompt_tokens - 1", second)
	}
	if outs[1].Text != outs[0].Text {
		t.Fatalf("cached prompt changed the text: %q vs %q", outs[1].Text, outs[0].Text)
	}
	stored, err := results.Fetch(ctx, s.bus.JS, outs[1].Tenant, outs[1].JobID)
	if err != nil {
		t.Fatal(err)
	}
	if stored.Usage.CachedTokens != second.CachedTokens {
		t.Fatalf("RESULTS usage %+v, terminal event %+v", stored.Usage, second)
	}

	gb, err := gatewaybus.New(testenv.Connect(t, s.bus.Server.ClientURL()), gatewaybus.Options{Logger: testenv.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	g, err := gateway.New(gateway.Config{Jobs: gb, Fleet: gb.Fleet(), Logger: testenv.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(g.Handler())
	t.Cleanup(srv.Close)
	post := func(path, body string) map[string]any {
		t.Helper()
		resp, err := http.Post(srv.URL+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var out map[string]any
		if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: %d %v %v", path, resp.StatusCode, out, err)
		}
		return out
	}
	cached := func(body map[string]any) (prompt, cached float64) {
		u, _ := body["usage"].(map[string]any)
		d, _ := u["prompt_tokens_details"].(map[string]any)
		if d == nil {
			t.Fatalf("usage %v has no prompt_tokens_details", u)
		}
		return u["prompt_tokens"].(float64), d["cached_tokens"].(float64)
	}
	// The same prompt as the jobs above: cached already.
	p, c := cached(post("/v1/completions", `{"model":"tiny","max_tokens":4,"prompt":"`+prompt+`"}`))
	if c != p-1 {
		t.Fatalf("completions: prompt_tokens %v, cached_tokens %v, want all but one cached", p, c)
	}
	chat := `{"model":"tiny","max_tokens":4,"messages":[{"role":"system","content":"` + prompt + `"},{"role":"user","content":"hi"}]}`
	if _, c := cached(post("/v1/chat/completions", chat)); c > 2 {
		t.Fatalf("first chat: cached_tokens %v, want at most a shared opening", c)
	}
	if p, c := cached(post("/v1/chat/completions", chat)); c != p-1 {
		t.Fatalf("chat asked again: prompt_tokens %v, cached_tokens %v, want all but one cached", p, c)
	}
}
