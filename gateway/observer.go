package gateway

import "time"

// Observer is told what the gateway does, for metrics: the pattern of
// worker.Observer and dispatcher.Observer, with plain values, so that neither
// gateway nor metrics imports the other. Calls come from request goroutines: an
// implementation must be safe for concurrent use, return at once and not call
// back into the gateway. Package metrics provides the Prometheus one
// (metrics.Gateway), wired by cmd/mlx-serving; nil in Config means nobody
// listens.
type Observer interface {
	// RequestStarted: an API request (an endpoint of /v1) arrived.
	RequestStarted()
	// RequestFinished: that request was answered with status (499: the client
	// left before anything was written), elapsed after it arrived.
	RequestFinished(endpoint string, status int, elapsed time.Duration)
	// JobSubmitted: a job was queued on the bus for endpoint.
	JobSubmitted(endpoint string)
	// ErrorAnswered: an error answer with this OpenAI code.
	ErrorAnswered(code string)
	// TenantRefused: a tenant limit refused a request with code.
	TenantRefused(tenant, code string)
	// ClientLeft: a client went away (or stopped reading: ClientStalled
	// too); its job was cancelled unless it sent an idempotency key.
	ClientLeft()
	// ClientStalled: a client took no write within the write timeout and was
	// dropped (Config.WriteTimeout).
	ClientStalled()
	// TokensCounted: a job completed with these prompt and completion tokens,
	// as the runtime counted them.
	TokensCounted(prompt, completion int)
	// EventsMissed: n token events were lost on a reply subject.
	EventsMissed(n int)
	// ResultRecovered: a terminal result was read from the result store because
	// its event was not seen.
	ResultRecovered()
}

// nopObserver is the Observer when none is configured.
type nopObserver struct{}

func (nopObserver) RequestStarted()                            {}
func (nopObserver) RequestFinished(string, int, time.Duration) {}
func (nopObserver) JobSubmitted(string)                        {}
func (nopObserver) ErrorAnswered(string)                       {}
func (nopObserver) TenantRefused(string, string)               {}
func (nopObserver) ClientLeft()                                {}
func (nopObserver) ClientStalled()                             {}
func (nopObserver) TokensCounted(int, int)                     {}
func (nopObserver) EventsMissed(int)                           {}
func (nopObserver) ResultRecovered()                           {}
