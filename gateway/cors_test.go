package gateway

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
)

const appOrigin = "https://app.example.com"

func preflight(t *testing.T, url, origin string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodOptions, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Origin", origin)
	req.Header.Set("Access-Control-Request-Method", "POST")
	req.Header.Set("Access-Control-Request-Headers", "authorization, content-type, x-stainless-os")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp
}

// A page of an allowed origin can call the API from a browser: its preflight is
// answered without credentials, and every answer to it, errors included, names
// it. Other origins get no CORS header, and without configured origins nobody
// does.
// Mutation caught: corsPolicy.allows answering true for every origin gives the
// other origin's preflight and request an Access-Control-Allow-Origin.
func TestCORSAllowsConfiguredOriginsOnly(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens})
	_, srv := newTestGateway(t, tb, func(c *Config) {
		c.Tokens = []string{"secret"}
		c.CORSOrigins = []string{appOrigin, "http://localhost:3000"}
	})
	chat := srv.URL + "/v1/chat/completions"

	p := preflight(t, chat, appOrigin)
	if p.StatusCode != http.StatusNoContent || p.Header.Get("Access-Control-Allow-Origin") != appOrigin {
		t.Fatalf("preflight: %d %v", p.StatusCode, p.Header)
	}
	methods, headers := p.Header.Get("Access-Control-Allow-Methods"), strings.ToLower(p.Header.Get("Access-Control-Allow-Headers"))
	for _, want := range []string{"GET", "POST", "OPTIONS"} {
		if !strings.Contains(methods, want) {
			t.Fatalf("Allow-Methods %q lacks %s", methods, want)
		}
	}
	for _, want := range []string{"authorization", "content-type", "x-stainless-os"} {
		if !strings.Contains(headers, want) {
			t.Fatalf("Allow-Headers %q lacks %s", headers, want)
		}
	}

	resp := postJSON(t, chat, chatBody(false, nil), "Authorization", "Bearer secret", "Origin", appOrigin)
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Access-Control-Allow-Origin") != appOrigin ||
		!strings.Contains(resp.Header.Get("Access-Control-Expose-Headers"), "X-Mlx-Job-Id") {
		t.Fatalf("request: %d %v", resp.StatusCode, resp.Header)
	}
	// An error is readable by the page too.
	resp = postJSON(t, chat, chatBody(false, nil), "Origin", appOrigin)
	if resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("Access-Control-Allow-Origin") != appOrigin {
		t.Fatalf("401: %d %v", resp.StatusCode, resp.Header)
	}

	const other = "https://evil.example.com"
	if p := preflight(t, chat, other); p.StatusCode == http.StatusNoContent || p.Header.Get("Access-Control-Allow-Origin") != "" {
		t.Fatalf("preflight from %s: %d %v", other, p.StatusCode, p.Header)
	}
	resp = postJSON(t, chat, chatBody(false, nil), "Authorization", "Bearer secret", "Origin", other)
	if got := resp.Header.Get("Access-Control-Allow-Origin"); got != "" || resp.Header.Get("Vary") != "Origin" {
		t.Fatalf("request from %s: Allow-Origin %q, Vary %q", other, got, resp.Header.Get("Vary"))
	}

	// Default: no origins, no CORS.
	_, plain := newTestGateway(t, tb, nil)
	if p := preflight(t, plain.URL+"/v1/chat/completions", appOrigin); p.Header.Get("Access-Control-Allow-Origin") != "" {
		t.Fatalf("CORS without configured origins: %v", p.Header)
	}
}

// "*" allows any origin; an origin that is no scheme://host[:port] is refused
// at start.
func TestCORSWildcardAndBadOrigins(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	_, srv := newTestGateway(t, tb, func(c *Config) { c.CORSOrigins = []string{"*"} })
	p := preflight(t, srv.URL+"/v1/models", "https://anyone.example")
	if p.StatusCode != http.StatusNoContent || p.Header.Get("Access-Control-Allow-Origin") != "*" {
		t.Fatalf("preflight: %d %v", p.StatusCode, p.Header)
	}
	for _, bad := range []string{"app.example.com", "https://app.example.com/path", "https://app.example.com?x=1", "https://"} {
		cfg := testConfig(t, tb.nc)
		cfg.CORSOrigins = []string{bad}
		if _, err := New(cfg); err == nil {
			t.Errorf("origin %q accepted", bad)
		}
	}
}
