package gateway

import (
	"net/http"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
)

// A request with logprobs is charged what its answer can hold of logprob
// entries before it is submitted: one that asks for more than a tenant's share
// is refused as invalid, naming the parameter; one that does not fit while
// others hold the budget is refused 429; the charge is given back when the
// answer ends. Before, four small requests took the gateway to half a GB
// (red team round 17, HTTP M2).
// Mutations caught: run without holdLogprobs (the large request is
// accepted); holdLogprobs without the refund (the third request is refused);
// holdLogprobs before checkJob (the overflowing request is charged).
func TestLogprobsAreChargedToABudget(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens, Prompt: 3})
	g, srv := newTestGateway(t, tb, nil)

	resp := postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, map[string]any{"n": 8, "max_tokens": 2000, "logprobs": true, "top_logprobs": 20}))
	expectError(t, resp, http.StatusBadRequest, "top_logprobs", codeLogprobsTooLarge)
	resp = postJSON(t, srv.URL+"/v1/completions", map[string]any{"model": testModel, "prompt": "hi", "max_tokens": 30000, "logprobs": 5})
	expectError(t, resp, http.StatusBadRequest, "logprobs", codeLogprobsTooLarge)

	// max_tokens past the schema's bound: refused by the job's bounds before
	// any charge (n × max_tokens × entries overflowed the budget's int64).
	g.logprobs.mu.Lock()
	g.logprobs.changed = make(chan struct{}, 1) // a token at each charge or refund
	g.logprobs.mu.Unlock()
	resp = postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, map[string]any{"n": 8, "max_tokens": 1 << 53, "logprobs": true, "top_logprobs": 0}))
	expectError(t, resp, http.StatusBadRequest, "max_tokens", "invalid_value")
	select {
	case <-g.logprobs.changed:
		t.Fatal("a request past the job's bounds was charged to the logprob budget")
	default:
	}
	g.logprobs.mu.Lock()
	g.logprobs.changed = nil
	g.logprobs.mu.Unlock()

	// The tenant's share held by others: a small request does not fit now.
	held := g.logprobs.share - 1000
	if g.logprobs.charge(DefaultTenant, held) != bodyFits {
		t.Fatal("could not hold the share")
	}
	small := chatBody(false, map[string]any{"max_tokens": 10, "logprobs": true, "top_logprobs": 2})
	expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", small), http.StatusTooManyRequests, "top_logprobs", codeLogprobsBudgetFull)
	g.logprobs.refund(DefaultTenant, held)
	for i := range 2 {
		if resp := postJSON(t, srv.URL+"/v1/chat/completions", small); resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d with the budget free: status %d", i, resp.StatusCode)
		}
	}
	g.logprobs.mu.Lock()
	defer g.logprobs.mu.Unlock()
	if g.logprobs.used != 0 {
		t.Errorf("%d bytes still charged after every answer ended", g.logprobs.used)
	}
}
