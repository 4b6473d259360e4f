package bus

import (
	"errors"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
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
	ErrNoStream = errors.New("bus: no stream for subject")
	// ErrNotConnected: the NATS connection is closed or currently disconnected.
	ErrNotConnected = errors.New("bus: not connected")
	// ErrResultExists: the job already has its terminal record in RESULTS; the
	// caller lost the first-writer-wins race and must not send a terminal event.
	ErrResultExists = errors.New("bus: job already has a result")
	// ErrModelNotServed: no worker serves the job's model, and none has within the
	// model grace period (BucketModels); nothing was queued. Submit with
	// WithoutModelCheck to queue it anyway.
	ErrModelNotServed = errors.New("bus: no worker serves the model")
	// ErrNoResult: RESULTS holds no terminal record for the job (yet).
	ErrNoResult = errors.New("bus: no result for job")
)

// JetStream API error codes the bus interprets. The client library names only some
// of them; these are the server's (nats-server jetstream_errors_generated.go).
const (
	jsErrInsufficientResources     jetstream.ErrorCode = 10023 // the server's JetStream storage is full
	jsErrJetStreamNotEnabledForAcc jetstream.ErrorCode = 10039
	jsErrMessageExceedsMaximum     jetstream.ErrorCode = 10054
	jsErrStreamNotFound            jetstream.ErrorCode = 10059
	jsErrExpectedStreamMismatch    jetstream.ErrorCode = 10060
	jsErrWrongLastSequence         jetstream.ErrorCode = 10071
	jsErrJetStreamNotEnabled       jetstream.ErrorCode = 10076
	jsErrStreamStoreFailed         jetstream.ErrorCode = 10077 // the store refused; description = store error text
	jsErrWrongLastSequenceConstant jetstream.ErrorCode = 10164 // R>1 variant of 10071
)

// Store error texts (nats-server store.go) carried as the description of 10077.
const (
	storeErrMaxMsgs           = "maximum messages exceeded"
	storeErrMaxBytes          = "maximum bytes exceeded"
	storeErrMaxMsgsPerSubject = "maximum messages per subject exceeded"
	storeErrMsgTooLarge       = "message too large"
)

// apiError extracts the JetStream API error from err, if there is one.
func apiError(err error) (*jetstream.APIError, bool) {
	var ae *jetstream.APIError
	if errors.As(err, &ae) && ae != nil {
		return ae, true
	}
	return nil, false
}

// storeRefusal reports which store limit refused a publish: the server answers all
// of them with code 10077 and the store error's text as the description.
func storeRefusal(err error) string {
	ae, ok := apiError(err)
	if !ok || ae.ErrorCode != jsErrStreamStoreFailed {
		return ""
	}
	d := strings.ToLower(ae.Description)
	switch {
	case strings.Contains(d, storeErrMaxMsgsPerSubject):
		return storeErrMaxMsgsPerSubject
	case strings.Contains(d, storeErrMaxMsgs):
		return storeErrMaxMsgs
	case strings.Contains(d, storeErrMaxBytes):
		return storeErrMaxBytes
	case strings.Contains(d, storeErrMsgTooLarge):
		return storeErrMsgTooLarge
	}
	return ""
}

// isNoStream reports errors that mean "nothing stores this subject".
func isNoStream(err error) bool {
	if errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders) ||
		errors.Is(err, jetstream.ErrStreamNotFound) || errors.Is(err, jetstream.ErrJetStreamNotEnabled) ||
		errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) {
		return true
	}
	if ae, ok := apiError(err); ok {
		switch ae.ErrorCode {
		case jsErrExpectedStreamMismatch, jsErrStreamNotFound, jsErrJetStreamNotEnabled, jsErrJetStreamNotEnabledForAcc:
			return true
		}
	}
	return false
}

// isDisconnected reports errors that mean the connection is unusable.
func isDisconnected(err error) bool {
	return errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, jetstream.ErrConnectionClosed) ||
		errors.Is(err, nats.ErrConnectionDraining) || errors.Is(err, nats.ErrConnectionReconnecting) ||
		errors.Is(err, nats.ErrDisconnected)
}
