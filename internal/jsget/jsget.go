// Package jsget reads the last message of a subject in a stream, the two ways
// this system needs: from the stream's leader (Leader: writers that decide on
// what is stored) and by direct get (Direct: readers, whose permission can be
// scoped by subject). Neither looks the stream up first.
package jsget

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jserr"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Timeout bounds a read when the caller's ctx has no deadline.
const Timeout = 5 * time.Second

// Leader returns the last message on subject as stream's leader holds it (a
// STREAM.MSG.GET), with its stream sequence, or an error matching
// jetstream.ErrMsgNotFound when the subject holds none. A direct get may be
// answered by a replica a moment behind, which a writer deciding on the
// stored message must not trust. The request names the subject in its body,
// where no permission can scope it: only dispatcher, worker and admin
// credentials may make it.
func Leader(ctx context.Context, js jetstream.JetStream, stream, subject string) ([]byte, uint64, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, Timeout)
		defer cancel()
	}
	req, err := json.Marshal(struct {
		LastFor string `json:"last_by_subj"`
	}{subject})
	if err != nil {
		return nil, 0, err
	}
	m, err := js.Conn().RequestWithContext(ctx, APIPrefix(js)+"STREAM.MSG.GET."+stream, req)
	if err != nil {
		return nil, 0, jserr.Map(err, "read "+subject)
	}
	var resp struct {
		Error   *jetstream.APIError `json:"error"`
		Message *struct {
			Data     []byte `json:"data"`
			Sequence uint64 `json:"seq"`
		} `json:"message"`
	}
	if err := json.Unmarshal(m.Data, &resp); err != nil {
		return nil, 0, fmt.Errorf("bus: read %s: %w", subject, err)
	}
	switch {
	case resp.Error != nil && resp.Error.ErrorCode == jetstream.JSErrCodeMessageNotFound:
		return nil, 0, jetstream.ErrMsgNotFound
	case resp.Error != nil:
		return nil, 0, jserr.Map(resp.Error, "read "+subject)
	case resp.Message == nil:
		return nil, 0, fmt.Errorf("bus: read %s: %w", subject, jetstream.ErrInvalidJetStreamResponse)
	}
	return resp.Message.Data, resp.Message.Sequence, nil
}

// DirectMsg is the server's answer to a direct get of subject's last message,
// unparsed: a stored message carries its writer's headers first and the
// server's (Nats-Sequence, Nats-Time-Stamp, ...) after them, so a reader that
// must not trust the writer takes the last value of each (registry.Entries).
// An answer with no message has a Status header and no Nats-Sequence. Without
// a deadline on ctx it waits Timeout at most.
func DirectMsg(ctx context.Context, js jetstream.JetStream, stream, subject string) (*nats.Msg, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, Timeout)
		defer cancel()
	}
	m, err := js.Conn().RequestWithContext(ctx, APIPrefix(js)+"DIRECT.GET."+stream+"."+subject, nil)
	if err != nil {
		if errors.Is(err, nats.ErrNoResponders) {
			// No responder: the stream is missing, or predates AllowDirect and has
			// not been provisioned again.
			return nil, fmt.Errorf("%w: direct get on %s: %w", jetstream.ErrStreamNotFound, stream, err)
		}
		return nil, err
	}
	return m, nil
}

// Direct reads the last message on subject with the direct get API, whose
// request subject carries the message subject: permissions can scope it, where a
// STREAM.MSG.GET (subject in the body) and a STREAM.INFO with a subject filter
// (which lists every job id) cannot be. It returns jetstream.ErrMsgNotFound
// when the subject is empty.
func Direct(ctx context.Context, js jetstream.JetStream, stream, subject string) ([]byte, error) {
	m, err := DirectMsg(ctx, js, stream, subject)
	if err != nil {
		return nil, err
	}
	if len(m.Data) == 0 {
		switch status := m.Header.Get("Status"); status {
		case "":
			// An empty record with the usual headers: not ours to judge here.
		case "404":
			return nil, jetstream.ErrMsgNotFound
		default:
			return nil, fmt.Errorf("bus: direct get on %s: status %s %s", stream, status, m.Header.Get("Description"))
		}
	}
	return m.Data, nil
}

// APIPrefix is the JetStream API prefix js sends requests under, with its dot.
func APIPrefix(js jetstream.JetStream) string {
	o := js.Options()
	switch {
	case o.APIPrefix != "":
		if !strings.HasSuffix(o.APIPrefix, ".") {
			return o.APIPrefix + "."
		}
		return o.APIPrefix
	case o.Domain != "":
		return "$JS." + o.Domain + ".API."
	}
	return jetstream.DefaultAPIPrefix
}
