package gateway

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
)

func limitedGateway(t *testing.T, limits TenantLimits) (*Gateway, string, *testBus) {
	t.Helper()
	tb := startBus(t, jsprov.Options{})
	tb.registerWorker(t, "w1", "ready", testModel)
	g, srv := newTestGateway(t, tb, func(c *Config) {
		c.Tokens = []string{"plain"}
		c.TokenTenants = map[string]string{"tok-a": "a", "tok-b": "b"}
		c.Limits = limits
	})
	return g, srv.URL, tb
}

// Mutation caught: admit not setting job.Tenant.
func TestTenantTokensMapJobsToTheirTenant(t *testing.T) {
	t.Parallel()
	_, url, tb := limitedGateway(t, TenantLimits{})
	fw := startFakeWorker(t, tb, fakeworker.Plan{Tokens: []string{"hi"}})
	for token, tenant := range map[string]string{"tok-a": "a", "plain": DefaultTenant} {
		resp := postJSON(t, url+"/v1/chat/completions", chatBody(false, nil), "Authorization", "Bearer "+token)
		if resp.StatusCode != http.StatusOK {
			data, _ := io.ReadAll(resp.Body)
			t.Fatalf("%s: %d %s", token, resp.StatusCode, data)
		}
		job := fw.nextJob(t)
		if job.Tenant != tenant || !strings.HasPrefix(job.ReplyTo, "mlx.reply."+tenant+".") {
			t.Fatalf("token %s: job tenant %q reply %q, want tenant %q", token, job.Tenant, job.ReplyTo, tenant)
		}
	}
	resp := postJSON(t, url+"/v1/chat/completions", chatBody(false, nil), "Authorization", "Bearer nope")
	expectError(t, resp, http.StatusUnauthorized, "", "invalid_api_key")
}

// Mutation caught: admit not refusing max_tokens above the limit; admit not
// counting the messages' characters.
func TestTenantOverMaxTokensOrPromptSizeIs400(t *testing.T) {
	t.Parallel()
	g, url, _ := limitedGateway(t, TenantLimits{MaxTokens: 16, MaxPromptChars: 12})
	resp := postJSON(t, url+"/v1/chat/completions", chatBody(false, map[string]any{"max_tokens": 17}), "Authorization", "Bearer tok-a")
	expectError(t, resp, http.StatusBadRequest, "max_tokens", codeMaxTokens)
	// "Be brief." + "Say hello" is 18 characters.
	resp = postJSON(t, url+"/v1/chat/completions", chatBody(false, nil), "Authorization", "Bearer tok-a")
	expectError(t, resp, http.StatusBadRequest, "messages", codePromptTooLong)
	resp = postJSON(t, url+"/v1/completions", map[string]any{"model": testModel, "prompt": strings.Repeat("é", 13)}, "Authorization", "Bearer tok-b")
	expectError(t, resp, http.StatusBadRequest, "prompt", codePromptTooLong)

	if n := value(observed(g).TenantRefusals.WithLabelValues("a", codeMaxTokens)); n != 1 {
		t.Errorf("max_tokens refusals of a: %v", n)
	}
	if n := value(observed(g).TenantRefusals.WithLabelValues("a", codePromptTooLong)); n != 1 {
		t.Errorf("prompt refusals of a: %v", n)
	}
	if n := value(observed(g).TenantRefusals.WithLabelValues("b", codePromptTooLong)); n != 1 {
		t.Errorf("prompt refusals of b: %v", n)
	}
}

// Mutation caught: limiter.allow always true; one bucket shared by all tenants
// (b's first request is refused).
func TestTenantRateLimitIs429PerTenantAndCounted(t *testing.T) {
	t.Parallel()
	// One request, then nothing for a thousand seconds.
	_, url, _ := limitedGateway(t, TenantLimits{RequestsPerSecond: 0.001, Burst: 1})
	get := func(token string) *http.Response {
		req, _ := http.NewRequest(http.MethodGet, url+"/v1/models", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = resp.Body.Close() })
		return resp
	}
	if resp := get("tok-a"); resp.StatusCode != http.StatusOK {
		t.Fatalf("first request of a: %d", resp.StatusCode)
	}
	resp := get("tok-a")
	if resp.Header.Get("Retry-After") == "" {
		t.Error("429 without Retry-After")
	}
	expectError(t, resp, http.StatusTooManyRequests, "", codeRateLimited)
	// Another tenant has its own bucket.
	if resp := get("tok-b"); resp.StatusCode != http.StatusOK {
		t.Fatalf("first request of b: %d", resp.StatusCode)
	}
	metrics, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer metrics.Body.Close()
	text, _ := io.ReadAll(metrics.Body)
	if !strings.Contains(string(text), `mlx_gateway_tenant_refusals_total{code="rate_limit_exceeded",tenant="a"} 1`) &&
		!strings.Contains(string(text), `mlx_gateway_tenant_refusals_total{tenant="a",code="rate_limit_exceeded"} 1`) {
		t.Fatalf("refusal not in /metrics:\n%s", text)
	}
}

// Mutation caught: limiter.acquire never at the limit; release not decrementing
// inFlight (a's slot is never released).
func TestTenantInFlightLimitIs429UntilAJobEnds(t *testing.T) {
	t.Parallel()
	g, url, tb := limitedGateway(t, TenantLimits{MaxInFlight: 1})
	fw := startFakeWorker(t, tb, fakeworker.Plan{Hang: true})

	// The first request's job is queued and never finishes while its client waits.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	first := make(chan error, 1)
	go func() {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url+"/v1/chat/completions",
			strings.NewReader(`{"model":"`+testModel+`","messages":[{"role":"user","content":"hi"}]}`))
		req.Header.Set("Authorization", "Bearer tok-a")
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		first <- err
	}()
	fw.nextJob(t)

	resp := postJSON(t, url+"/v1/chat/completions", chatBody(false, nil), "Authorization", "Bearer tok-a")
	expectError(t, resp, http.StatusTooManyRequests, "", codeTenantQueue)
	if n := value(observed(g).TenantRefusals.WithLabelValues("a", codeTenantQueue)); n != 1 {
		t.Errorf("in-flight refusals of a: %v", n)
	}
	// Tenant b is not affected by a's jobs.
	bctx, bcancel := context.WithCancel(context.Background())
	defer bcancel()
	go func() {
		req, _ := http.NewRequestWithContext(bctx, http.MethodPost, url+"/v1/chat/completions",
			strings.NewReader(`{"model":"`+testModel+`","messages":[{"role":"user","content":"hi"}]}`))
		req.Header.Set("Authorization", "Bearer tok-b")
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	if job := fw.nextJob(t); job.Tenant != "b" {
		t.Fatalf("queued job of tenant %q, want b", job.Tenant)
	}
	bcancel()

	// When a's client leaves, its slot is free again.
	cancel()
	<-first
	deadline := time.Now().Add(30 * time.Second)
	for {
		release, ok := g.limits.acquire("a")
		if ok {
			release()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a's slot was never released")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
