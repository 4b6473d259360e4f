package gateway

import (
	"net/http"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
)

// TestWithoutObserver: a gateway built without Observer and Metrics serves
// requests (nobody is told) and has no /metrics. Mutation caught: New not
// defaulting Observer to nopObserver (a nil Observer panics on the first
// request).
func TestWithoutObserver(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens})
	_, srv := newTestGateway(t, tb, func(c *Config) { c.Observer, c.Metrics = nil, nil })
	resp := postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, nil))
	if resp.StatusCode != http.StatusOK {
		expectError(t, resp, http.StatusOK, "", "")
	}
	r, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	r.Body.Close()
	if r.StatusCode != http.StatusNotFound {
		t.Fatalf("/metrics without Config.Metrics: %d", r.StatusCode)
	}
}
