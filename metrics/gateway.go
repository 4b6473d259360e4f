package metrics

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Gateway is one HTTP gateway's metrics and its hooks (it implements
// gateway.Observer): pass it as gateway.Config.Observer, and its Handler as
// gateway.Config.Metrics. The series live in a registry of their own, so several
// gateways in one process (tests, embedders) count apart; Handler serves them
// together with the process's Default registry.
type Gateway struct {
	Registry         *prometheus.Registry
	Requests         *prometheus.CounterVec // endpoint, code
	Duration         *prometheus.HistogramVec
	InFlight         prometheus.Gauge
	Submitted        *prometheus.CounterVec // endpoint
	Errors           *prometheus.CounterVec // code
	TenantRefusals   *prometheus.CounterVec // tenant, code
	Disconnects      prometheus.Counter
	Stalls           prometheus.Counter
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
		TenantRefusals:   GatewayTenantRefusals.counterVec(),
		Disconnects:      GatewayDisconnects.counter(),
		Stalls:           GatewayStalls.counter(),
		PromptTokens:     GatewayPromptTokens.counter(),
		CompletionTokens: GatewayCompletionTokens.counter(),
		MissedEvents:     GatewayMissedEvents.counter(),
		Recovered:        GatewayRecovered.counter(),
	}
	g.Registry.MustRegister(g.Requests, g.Duration, g.InFlight, g.Submitted, g.Errors, g.TenantRefusals, g.Disconnects,
		g.Stalls, g.PromptTokens, g.CompletionTokens, g.MissedEvents, g.Recovered)
	return g
}

// Handler serves the gateway's metrics and the process's Default registry.
func (g *Gateway) Handler() http.Handler { return Handler(Default(), g.Registry) }

// RequestStarted implements gateway.Observer.
func (g *Gateway) RequestStarted() { g.InFlight.Inc() }

// RequestFinished implements gateway.Observer.
func (g *Gateway) RequestFinished(endpoint string, status int, elapsed time.Duration) {
	g.InFlight.Dec()
	g.Requests.WithLabelValues(endpoint, strconv.Itoa(status)).Inc()
	g.Duration.WithLabelValues(endpoint).Observe(elapsed.Seconds())
}

// JobSubmitted implements gateway.Observer.
func (g *Gateway) JobSubmitted(endpoint string) { g.Submitted.WithLabelValues(endpoint).Inc() }

// ErrorAnswered implements gateway.Observer.
func (g *Gateway) ErrorAnswered(code string) { g.Errors.WithLabelValues(code).Inc() }

// TenantRefused implements gateway.Observer.
func (g *Gateway) TenantRefused(tenant, code string) {
	g.TenantRefusals.WithLabelValues(tenant, code).Inc()
}

// ClientLeft implements gateway.Observer.
func (g *Gateway) ClientLeft() { g.Disconnects.Inc() }

// ClientStalled implements gateway.Observer.
func (g *Gateway) ClientStalled() { g.Stalls.Inc() }

// TokensCounted implements gateway.Observer.
func (g *Gateway) TokensCounted(prompt, completion int) {
	g.PromptTokens.Add(float64(prompt))
	g.CompletionTokens.Add(float64(completion))
}

// EventsMissed implements gateway.Observer.
func (g *Gateway) EventsMissed(n int) { g.MissedEvents.Add(float64(n)) }

// ResultRecovered implements gateway.Observer.
func (g *Gateway) ResultRecovered() { g.Recovered.Inc() }
