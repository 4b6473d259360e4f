package dispatcher

import (
	"context"
	"errors"

	"github.com/nats-io/nats.go/jetstream"
)

// lastMsg returns the last message of subject in stream, or nil if there is none.
func lastMsg(ctx context.Context, s jetstream.Stream, subject string) (*jetstream.RawStreamMsg, error) {
	m, err := s.GetLastMsgForSubject(ctx, subject)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil, nil
	}
	return m, err
}
