package bus

import (
	"errors"
	"strings"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/jserr"
	"github.com/mlx-serving/mlx-serving/internal/results"
)

// Sentinel errors of the bus package. Every error a caller is expected to act on
// matches one of these with errors.Is; the wrapped error keeps the server's words.
var (
	// ErrQueueFull: JOBS is at its message or byte limit and refused the job
	// (discard-new), so nothing was queued. Retry later.
	ErrQueueFull = errors.New("bus: job queue full")
	// ErrDuplicate: a job with this id is already queued, running or finished; the
	// submission was recognised and not queued a second time.
	ErrDuplicate = errors.New("bus: duplicate job id")
	// ErrJobTooLarge: the job exceeds the stream's or the server's message size limit.
	ErrJobTooLarge = errors.New("bus: job too large")
	// ErrNoStream: no stream answers for the subject (not provisioned, or JetStream
	// unavailable).
	ErrNoStream = jserr.ErrNoStream
	// ErrNotConnected: the NATS connection is closed or currently disconnected.
	ErrNotConnected = jserr.ErrNotConnected
	// ErrStreamFull: the stream (CANCELS for a cancel) is at its limits, or
	// the server's JetStream storage is full; nothing was stored. Retry later.
	// A full JOBS answers a submit with ErrQueueFull instead.
	ErrStreamFull = jserr.ErrStreamFull
	// ErrTooLarge: the message (a cancel) exceeds the stream's or the server's
	// size limit; nothing was stored. A submit answers ErrJobTooLarge instead.
	ErrTooLarge = jserr.ErrTooLarge
	// ErrUnavailable: the server did not take the job or cancel — its store
	// failed, or it did not answer in time (a submit's outcome then unknown:
	// a retry with the same id is recognised). Retry later.
	ErrUnavailable = jserr.ErrUnavailable
	// ErrModelNotServed: no worker serves the job's model, and none has within the
	// model grace period (5 minutes by default); nothing was queued. Submit with
	// WithoutModelCheck to queue it anyway.
	ErrModelNotServed = errors.New("bus: no worker serves the model")
	// ErrNoResult: RESULTS holds no terminal record for the job (yet).
	ErrNoResult = results.ErrNoResult
	// ErrNotSubmitted: the submit ended (its context did, say) before the job
	// was published, so nothing can have been queued; the error wraps why. A
	// context error without it may have come after the publish: the job may be
	// queued.
	ErrNotSubmitted = errors.New("bus: job not submitted")
	// ErrPermissionDenied: the server refused the credential the subject
	// (another tenant's jobs, records or replies, or a client without
	// WithTenant submitting for its tenant's). Retrying will not help.
	ErrPermissionDenied = errors.New("bus: permission denied")
)

// deniedOn is the permissions violation nc's server last reported for
// subject (a publish or subscribe the credential is not granted), or nil. The
// server answers such a request only with that asynchronous error, never a
// reply: without this the call waited out its timeout and said "server
// unavailable, retry later" (red team round 22, the bus client's F2).
func deniedOn(nc *nats.Conn, subject string) error {
	if nc == nil || subject == "" {
		return nil
	}
	err := nc.LastError()
	if err == nil || !errors.Is(err, nats.ErrPermissionViolation) || !strings.Contains(err.Error(), `"`+subject+`"`) {
		return nil
	}
	return err
}
