package dispatcher

import (
	"context"
	"errors"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go/jetstream"
)

// The RESULTS conventions (first writer wins, then the reply subject) live in
// package bus; these names keep the call sites short.
var (
	errResultExists = bus.ErrResultExists
)

func recordResult(ctx context.Context, js jetstream.JetStream, res *schemas.ResultMsg) error {
	return bus.RecordResult(ctx, js, res)
}

// lastMsg returns the last message of subject in stream, or nil if there is none.
func lastMsg(ctx context.Context, s jetstream.Stream, subject string) (*jetstream.RawStreamMsg, error) {
	m, err := s.GetLastMsgForSubject(ctx, subject)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil, nil
	}
	return m, err
}
