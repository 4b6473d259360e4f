package metrics

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
)

// Gateway is one HTTP gateway's metrics. They live in a registry of their own, so
// several gateways in one process (tests, embedders) count apart; Handler serves
// them together with the process's Default registry.
type Gateway struct {
	Registry         *prometheus.Registry
	Requests         *prometheus.CounterVec // endpoint, code
	Duration         *prometheus.HistogramVec
	InFlight         prometheus.Gauge
	Submitted        *prometheus.CounterVec // endpoint
	Errors           *prometheus.CounterVec // code
	Disconnects      prometheus.Counter
	PromptTokens     prometheus.Counter
	CompletionTokens prometheus.Counter
	MissedEvents     prometheus.Counter
	Recovered        prometheus.Counter
}

// NewGateway returns a gateway's metrics, registered in a fresh registry.
func NewGateway() *Gateway {
	g := &Gateway{
		Registry:         prometheus.NewRegistry(),
		Requests:         GatewayRequests.counterVec(),
		Duration:         GatewayDuration.histogramVec(),
		InFlight:         GatewayInFlight.gauge(),
		Submitted:        GatewaySubmitted.counterVec(),
		Errors:           GatewayErrors.counterVec(),
		Disconnects:      GatewayDisconnects.counter(),
		PromptTokens:     GatewayPromptTokens.counter(),
		CompletionTokens: GatewayCompletionTokens.counter(),
		MissedEvents:     GatewayMissedEvents.counter(),
		Recovered:        GatewayRecovered.counter(),
	}
	g.Registry.MustRegister(g.Requests, g.Duration, g.InFlight, g.Submitted, g.Errors, g.Disconnects,
		g.PromptTokens, g.CompletionTokens, g.MissedEvents, g.Recovered)
	return g
}

// Handler serves the gateway's metrics and the process's Default registry.
func (g *Gateway) Handler() http.Handler { return Handler(Default(), g.Registry) }
