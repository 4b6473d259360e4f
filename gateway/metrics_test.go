package gateway

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	shared "github.com/mlx-serving/mlx-serving/metrics"
)

// Metric labels carry only model names a worker announced: the gateway's own
// series have no model label, and the fleet's (by model, from RESULTS) see only
// jobs the gateway queued, which name announced models. A client naming models
// at will would otherwise make a series per name.
// Mutation caught: run() queueing modelUnknown jobs (no 404) puts the client's
// names into mlx_fleet_jobs_finished_total{model=...}.
func TestMetricLabelsOnlyAnnouncedModels(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens, Prompt: 2})
	fleet, err := shared.NewFleet(shared.FleetOptions{Conn: tb.connect(t), Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := fleet.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fleet.Stop)
	fleetReg := prometheus.NewRegistry()
	fleetReg.MustRegister(fleet)
	gm := shared.NewGateway()
	_, srv := newTestGateway(t, tb, func(c *Config) { c.Observer, c.Metrics = gm, shared.Handler(fleetReg, gm.Registry) })

	for i, stream := range []bool{false, true} {
		name := []string{"client-made-up-a", "client-made-up-b"}[i]
		resp := postJSON(t, srv.URL+"/v1/chat/completions", chatBody(stream, map[string]any{"model": name}))
		_, _ = io.Copy(io.Discard, resp.Body)
		resp = postJSON(t, srv.URL+"/v1/completions", map[string]any{"model": name, "prompt": "hi", "stream": stream})
		_, _ = io.Copy(io.Discard, resp.Body)
	}
	// Then one the fleet serves: once its result is counted, all earlier are.
	resp := postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, nil))
	if resp.StatusCode != http.StatusOK {
		expectError(t, resp, http.StatusOK, "", "")
	}
	var body string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		r, err := http.Get(srv.URL + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(r.Body)
		r.Body.Close()
		body = string(data)
		if strings.Contains(body, `mlx_fleet_jobs_finished_total{status="completed",model="`+testModel+`"}`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the fleet observer never counted the served job:\n%s", body)
		}
	}
	if strings.Contains(body, "client-made-up") {
		t.Fatalf("a client-supplied model became a label:\n%s", body)
	}
	if !strings.Contains(body, `mlx_gateway_errors_total{code="model_not_found"} 4`) {
		t.Fatalf("the refusals are not counted by code:\n%s", body)
	}
}
