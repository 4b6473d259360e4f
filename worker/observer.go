package worker

// Observer is told what the agent does, for metrics. Calls come from the agent's
// own goroutines, some while it holds a lock: an implementation must return at
// once and must not call back into the agent. Package metrics provides the
// Prometheus one (metrics.Worker); nil in Config means nobody listens.
type Observer interface {
	// Slots is the configured concurrency, told once at New.
	Slots(n int)
	// InFlight is the number of jobs holding a slot, told on every change.
	InFlight(n int)
	// State is the lifecycle state, told on every change.
	State(s string)
	// RuntimeStart tells how one start (or half-open probe) of the runtime ended:
	// ok when it passed runtime.info, the model loads and a health check.
	RuntimeStart(ok bool)
	// RuntimeLost: a runtime that was up crashed or failed its health check; the
	// supervisor restarts it (or the breaker holds it off).
	RuntimeLost()
	// Breaker is the runtime circuit breaker's state, told on every change.
	Breaker(state string)
	// Assignment is one answered assignment: accepted, full or rejected, and how
	// many jobs it carried.
	Assignment(status string, jobs int)
	// SchemaRejected: an assigned job failed the job schema and ends failed with
	// invalid_request.
	SchemaRejected()
	// JobStarted: an attempt of a job started here; resumed when it continues text
	// an earlier attempt already streamed (the job migrated here).
	JobStarted(model string, attempt int, resumed bool)
	// JobFinished: this worker recorded the job's terminal result.
	JobFinished(model, status string)
	// AttemptReported: an attempt ended without a terminal and was reported for a
	// retry elsewhere, with its error code.
	AttemptReported(code string)
}

// nopObserver is the Observer when none is configured.
type nopObserver struct{}

func (nopObserver) Slots(int)                    {}
func (nopObserver) InFlight(int)                 {}
func (nopObserver) State(string)                 {}
func (nopObserver) RuntimeStart(bool)            {}
func (nopObserver) RuntimeLost()                 {}
func (nopObserver) Breaker(string)               {}
func (nopObserver) Assignment(string, int)       {}
func (nopObserver) SchemaRejected()              {}
func (nopObserver) JobStarted(string, int, bool) {}
func (nopObserver) JobFinished(string, string)   {}
func (nopObserver) AttemptReported(string)       {}
