package worker

import (
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
)

// onlyOn passes h the messages published on subj and drops every other one.
//
// A subscription also receives what a JetStream push consumer delivers to its
// subject, and such a message keeps the subject it was stored under, not the
// one it was delivered on. Anyone allowed to create a consumer on any stream
// can name any deliver subject — the server checks its publish permissions on
// the API request, not on the deliveries — so without this check a credential
// that may only read some bucket could replay a value it wrote there (say, a
// worker's own registry entry holding an assignment) onto another worker's
// assign or cancel subject, which it may not publish on: the red team's R3-1
// ran a forged attempt that way and got its text stored as the job's record.
// A published message always arrives with the subscribed literal subject.
func onlyOn(subj string, h nats.MsgHandler, log zerolog.Logger) nats.MsgHandler {
	return func(msg *nats.Msg) {
		if msg.Subject != subj {
			log.Warn().Str("subject", subj).Str("stored_as", msg.Subject).
				Msg("dropped a message delivered by a JetStream consumer, not published here")
			return
		}
		h(msg)
	}
}
