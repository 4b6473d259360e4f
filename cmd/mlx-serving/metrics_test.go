package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/mlx-serving/mlx-serving/config"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

// TestGatewayMetricsMoveToMetricsAddr: with metrics_addr set, the gateway's
// /metrics (its own series and the shared registry's) is served there and not
// on http_addr, where clients reach it; without it, on http_addr as before.
// Before, the gateway served /metrics on http_addr whatever metrics_addr said
// (red team round 16): anyone who could reach the API read the fleet's queue
// depth, per-model counts and records held.
// Mutations caught: gatewayMetricsHandler ignoring MetricsAddr (http_addr still
// serves it); startMetrics serving metrics.Handler(reg) for the gateway (no
// gateway series on metrics_addr).
func TestGatewayMetricsMoveToMetricsAddr(t *testing.T) {
	b := testenv.StartBus(t, jsprov.Options{})
	log := testenv.Logger(t)
	const series = "mlx_gateway_http_requests_in_flight"

	get := func(h http.Handler) (int, string) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
		return rec.Code, rec.Body.String()
	}

	var c config.Config
	g, err := newGateway(c, b.Conn, "tiny", log)
	if err != nil {
		t.Fatal(err)
	}
	if code, body := get(g.Handler()); code != http.StatusOK || !strings.Contains(body, series) {
		t.Fatalf("no metrics_addr: GET http_addr/metrics = %d (has %s: %v), want 200 with it", code, series, strings.Contains(body, series))
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c.MetricsAddr = ln.Addr().String()
	_ = ln.Close()
	g, err = newGateway(c, b.Conn, "tiny", log)
	if err != nil {
		t.Fatal(err)
	}
	if code, _ := get(g.Handler()); code != http.StatusNotFound {
		t.Errorf("metrics_addr set: GET http_addr/metrics = %d, want 404", code)
	}
	stop, err := startMetrics(context.Background(), "gateway", c.MetricsAddr, b.Conn, log)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	resp, err := http.Get("http://" + c.MetricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), series) || !strings.Contains(string(body), "go_goroutines") {
		t.Errorf("metrics_addr: GET /metrics = %d, want 200 with %s and the shared registry's series; got:\n%.2000s", resp.StatusCode, series, body)
	}
}
