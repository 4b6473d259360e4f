package gateway

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
)

// TestAuthenticate is the one bearer-token check, every way a header can be
// wrong. Mutation caught: authenticate accepting any scheme (Basic sk-one let
// in); not trimming the token ("BEARER  sk-two " refused).
func TestAuthenticate(t *testing.T) {
	t.Parallel()
	ta, err := newTenantAuth([]string{"sk-one", "sk-two", ""}, map[string]string{"tok-a": "a"})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		header, tenant string
		ok             bool
	}{
		{"", "", false},
		{"Bearer", "", false},
		{"Basic sk-one", "", false},
		{"Bearer sk-on", "", false},
		{"Bearer sk-one2", "", false},
		{"Bearer ", "", false},
		{"Bearer tok-a", "a", true},
		{"Bearer sk-one", DefaultTenant, true},
		{"Bearer sk-two", DefaultTenant, true},
		{"bearer sk-two", DefaultTenant, true},
		{"BEARER  sk-two ", DefaultTenant, true},
	}
	for _, c := range cases {
		r := httptest.NewRequest(http.MethodGet, "/v1/models", nil)
		if c.header != "" {
			r.Header.Set("Authorization", c.header)
		}
		tenant, aerr := ta.authenticate(r)
		if ok := aerr == nil; ok != c.ok || tenant != c.tenant {
			t.Errorf("%q: tenant %q, error %v; want tenant %q, ok %v", c.header, tenant, aerr, c.tenant, c.ok)
		}
		if aerr != nil && (aerr.Status != http.StatusUnauthorized || aerr.Code != "invalid_api_key") {
			t.Errorf("%q: %d %s, want 401 invalid_api_key", c.header, aerr.Status, aerr.Code)
		}
	}

	// No tokens: everyone is the default tenant, whatever they send.
	none, err := newTenantAuth(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := httptest.NewRequest(http.MethodGet, "/v1/models", nil)
	r.Header.Set("Authorization", "Bearer anything")
	if tenant, aerr := none.authenticate(r); aerr != nil || tenant != DefaultTenant {
		t.Fatalf("without tokens: %q %v", tenant, aerr)
	}
	if _, err := newTenantAuth(nil, map[string]string{"t": "Not A Tenant"}); err == nil {
		t.Fatal("a tenant the job schema refuses was accepted")
	}
}

// TestAuth: every /v1 route, endpoints and unknown paths alike, goes through
// the check; health, readiness and metrics do not.
func TestAuth(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens})
	_, srv := newTestGateway(t, tb, func(c *Config) { c.Tokens = []string{"sk-one", "sk-two"} })

	expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, nil)), http.StatusUnauthorized, "", "invalid_api_key")
	expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, nil), "Authorization", "Bearer sk-on"), http.StatusUnauthorized, "", "invalid_api_key")
	expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, nil), "Authorization", "Basic sk-one"), http.StatusUnauthorized, "", "invalid_api_key")

	resp := postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, nil), "Authorization", "Bearer sk-two")
	if resp.StatusCode != http.StatusOK {
		expectError(t, resp, 200, "", "")
	}
	req, _ := http.NewRequest(http.MethodGet, srv.URL+"/v1/models", nil)
	r2, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	r2.Body.Close()
	if r2.StatusCode != http.StatusUnauthorized || !strings.HasPrefix(r2.Header.Get("WWW-Authenticate"), "Bearer") {
		t.Fatalf("models without token: %d", r2.StatusCode)
	}
	// An unknown /v1 path is 401 without a token, 404 with one.
	for header, want := range map[string]int{"": http.StatusUnauthorized, "Bearer sk-one": http.StatusNotFound} {
		req, _ := http.NewRequest(http.MethodGet, srv.URL+"/v1/nothing", nil)
		if header != "" {
			req.Header.Set("Authorization", header)
		}
		r, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		r.Body.Close()
		if r.StatusCode != want {
			t.Fatalf("/v1/nothing with %q: %d, want %d", header, r.StatusCode, want)
		}
	}
	// Health and metrics stay open.
	for _, path := range []string{"/healthz", "/readyz", "/metrics"} {
		r, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		r.Body.Close()
		if r.StatusCode != http.StatusOK {
			t.Fatalf("%s: %d", path, r.StatusCode)
		}
	}
}
