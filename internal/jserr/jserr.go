// Package jserr says what the JetStream server's and the NATS client's errors
// mean to the bus: the two sentinels every bus operation may return
// (ErrNotConnected, ErrNoStream), the server's API error codes and store
// refusals the bus interprets, and Map, which turns any other error into one of
// the sentinels where it is one (a store refusal: ErrStreamFull, ErrTooLarge).
// The bus package re-exports the sentinels, so
// errors.Is matches them whichever package returned them.
package jserr

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

var (
	// ErrNoStream: no stream answers for the subject (not provisioned, or JetStream
	// unavailable).
	ErrNoStream = errors.New("bus: no stream for subject")
	// ErrNotConnected: the NATS connection is closed or currently disconnected.
	ErrNotConnected = errors.New("bus: not connected")
	// ErrStreamFull: the stream is at its message or byte limit (discard-new),
	// or the server's JetStream storage is full, and refused the message:
	// nothing was stored. Retry later.
	ErrStreamFull = errors.New("bus: stream full")
	// ErrTooLarge: the message exceeds the stream's or the server's size limit;
	// nothing was stored, and retrying will not help.
	ErrTooLarge = errors.New("bus: message too large")
	// ErrUnavailable: the server did not take the message — its store failed
	// (a JetStream 5xx that is no limit: a write error, no quorum) or it did
	// not answer in time (then whether it was stored is unknown). Retry later.
	ErrUnavailable = errors.New("bus: server unavailable")
)

// JetStream API error codes the bus interprets. The client library names only some
// of them; these are the server's (nats-server jetstream_errors_generated.go).
const (
	CodeInsufficientResources     jetstream.ErrorCode = 10023 // the server's JetStream storage is full
	codeJetStreamNotEnabledForAcc jetstream.ErrorCode = 10039
	CodeMessageExceedsMaximum     jetstream.ErrorCode = 10054
	codeStreamNotFound            jetstream.ErrorCode = 10059
	codeExpectedStreamMismatch    jetstream.ErrorCode = 10060
	CodeWrongLastSequence         jetstream.ErrorCode = 10071
	codeJetStreamNotEnabled       jetstream.ErrorCode = 10076
	codeStreamStoreFailed         jetstream.ErrorCode = 10077 // the store refused; description = store error text
	CodeWrongLastSequenceConstant jetstream.ErrorCode = 10164 // R>1 variant of 10071
)

// Store error texts (nats-server store.go) carried as the description of 10077.
const (
	StoreMaxMsgs           = "maximum messages exceeded"
	StoreMaxBytes          = "maximum bytes exceeded"
	StoreMaxMsgsPerSubject = "maximum messages per subject exceeded"
	StoreMsgTooLarge       = "message too large"
)

// APIError extracts the JetStream API error from err, if there is one.
func APIError(err error) (*jetstream.APIError, bool) {
	var ae *jetstream.APIError
	if errors.As(err, &ae) && ae != nil {
		return ae, true
	}
	return nil, false
}

// StoreRefusal reports which store limit refused a publish (one of the Store*
// texts, or ""): the server answers all of them with code 10077 and the store
// error's text as the description.
func StoreRefusal(err error) string {
	ae, ok := APIError(err)
	if !ok || ae.ErrorCode != codeStreamStoreFailed {
		return ""
	}
	d := strings.ToLower(ae.Description)
	switch {
	case strings.Contains(d, StoreMaxMsgsPerSubject):
		return StoreMaxMsgsPerSubject
	case strings.Contains(d, StoreMaxMsgs):
		return StoreMaxMsgs
	case strings.Contains(d, StoreMaxBytes):
		return StoreMaxBytes
	case strings.Contains(d, StoreMsgTooLarge):
		return StoreMsgTooLarge
	}
	return ""
}

// IsNoStream reports errors that mean "nothing stores this subject".
func IsNoStream(err error) bool {
	if errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders) ||
		errors.Is(err, jetstream.ErrStreamNotFound) || errors.Is(err, jetstream.ErrJetStreamNotEnabled) ||
		errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) {
		return true
	}
	if ae, ok := APIError(err); ok {
		switch ae.ErrorCode {
		case codeExpectedStreamMismatch, codeStreamNotFound, codeJetStreamNotEnabled, codeJetStreamNotEnabledForAcc:
			return true
		}
	}
	return false
}

// IsDisconnected reports errors that mean the connection is unusable.
func IsDisconnected(err error) bool {
	return errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, jetstream.ErrConnectionClosed) ||
		errors.Is(err, nats.ErrConnectionDraining) || errors.Is(err, nats.ErrConnectionReconnecting) ||
		errors.Is(err, nats.ErrDisconnected)
}

// Map turns client and server errors into the sentinels, keeping the original
// error in the chain; what names the operation ("submit <id>").
func Map(err error, what string) error {
	switch {
	case err == nil:
		return nil
	case IsDisconnected(err):
		return fmt.Errorf("bus: %s: %w: %w", what, ErrNotConnected, err)
	case IsNoStream(err):
		return fmt.Errorf("bus: %s: %w: %w", what, ErrNoStream, err)
	case IsFull(err):
		return fmt.Errorf("bus: %s: %w: %w", what, ErrStreamFull, err)
	case IsTooLarge(err):
		return fmt.Errorf("bus: %s: %w: %w", what, ErrTooLarge, err)
	case IsUnavailable(err):
		return fmt.Errorf("bus: %s: %w: %w", what, ErrUnavailable, err)
	}
	return fmt.Errorf("bus: %s: %w", what, err)
}

// IsFull reports a publish the stream refused for want of room: its message or
// byte limit (discard-new), or the server's JetStream storage.
func IsFull(err error) bool {
	switch StoreRefusal(err) {
	case StoreMaxMsgs, StoreMaxBytes:
		return true
	}
	ae, ok := APIError(err)
	return ok && ae.ErrorCode == CodeInsufficientResources
}

// IsTooLarge reports a publish refused for its size: the stream's MaxMsgSize
// (a store refusal or API code 10054) or the server's max payload.
func IsTooLarge(err error) bool {
	if StoreRefusal(err) == StoreMsgTooLarge || errors.Is(err, nats.ErrMaxPayload) {
		return true
	}
	ae, ok := APIError(err)
	return ok && ae.ErrorCode == CodeMessageExceedsMaximum
}

// IsAlreadyStored reports a publish refused because its subject already holds
// a message: an expected last subject sequence that did not match (the
// first-writer-wins records, a job's "nothing at any priority"), or the
// stream's one-message-per-subject limit (discard-new per subject).
func IsAlreadyStored(err error) bool {
	if ae, ok := APIError(err); ok {
		switch ae.ErrorCode {
		case CodeWrongLastSequence, CodeWrongLastSequenceConstant:
			return true
		}
	}
	return StoreRefusal(err) == StoreMaxMsgsPerSubject
}

// IsUnavailable reports a server that did not take a request: a JetStream
// API error of the 5xx class (a store that failed, no quorum; the limits
// IsFull and IsTooLarge name are checked first by Map), or no answer in time.
func IsUnavailable(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) {
		return true
	}
	ae, ok := APIError(err)
	return ok && ae.Code >= 500
}
