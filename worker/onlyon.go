package worker

import (
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
)

// onlyOn passes h the messages a client published on subj, and drops what the
// server delivered there on someone else's behalf. Two such ways exist:
//
//   - A JetStream push consumer whose deliver subject is subj (anyone allowed
//     to create a consumer may name any deliver subject). Its messages keep
//     the subject they were stored under, not subj: the red team's R3-1
//     replayed an assignment a worker wrote as its own registry value onto
//     w1's assign subject that way, and the forged run's text became the
//     job's record.
//   - A JetStream API answer (a direct get of a value a worker credential
//     wrote) sent to subj as the requester's reply subject: it arrives on subj
//     itself, but without a reply subject (subjects.Sent; the red team's N1).
//     Assignments are requests and the dispatcher sends cancels with a reply
//     subject, so whatever comes without one is dropped.
func onlyOn(subj string, h nats.MsgHandler, log zerolog.Logger) nats.MsgHandler {
	log = log.Sample(&zerolog.BurstSampler{Burst: 5, Period: 10 * time.Second}) // a flood must not flood the log
	return func(msg *nats.Msg) {
		if msg.Subject != subj || !subjects.Sent(msg.Reply) {
			log.Warn().Str("subject", subj).Str("stored_as", msg.Subject).Bool("reply", msg.Reply != "").
				Msg("dropped a message the server relayed here (a consumer's delivery or an API answer), not one a dispatcher published")
			return
		}
		h(msg)
	}
}
