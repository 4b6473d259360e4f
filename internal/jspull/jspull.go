// Package jspull pulls stored messages from a JetStream pull consumer by
// hand, telling them from the server's status messages by their reply
// subject.
//
// Why not nats.go's jetstream Fetch: its reader takes any delivery with an
// empty body and a Status header for the server's own status message, and a
// producer can store exactly that: a job with no body and the headers
// "Status: 404, Description: No Messages". Every pull that met it ended
// quietly without it and without every job behind it in the batch, the job
// was never acked or terminated, and its neighbours came back only after the
// ack wait, their delivery counts (their attempt numbers) rising each time:
// 1,030 such messages from one tenant stopped every tenant's normal-priority
// jobs, and a trickle of them failed another tenant's jobs
// attempts_exhausted without a run (red team round 17, tenant F1). A stored
// message always comes with the server's $JS.ACK reply subject; a status
// message never has one, and no client can set it.
package jspull

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// ackPrefix starts the reply subject of every message a consumer delivers
// from its stream.
const ackPrefix = "$JS.ACK."

// Request is one pull: at most Batch messages (and MaxBytes, when set); with
// NoWait the server answers at once with what it holds, else it waits up to
// Expires for the batch to fill.
type Request struct {
	Batch    int
	MaxBytes int
	Expires  time.Duration
	NoWait   bool
}

// ErrStatus is a status message that ends a pull with an error (a 409: the
// consumer was deleted, its leader changed, too many waiting pulls, ...).
var ErrStatus = errors.New("jspull: pull ended by the server")

// Fetch sends r to consumer on stream through apiPrefix (with its dot, as
// jsget.APIPrefix gives it) and returns the stored messages delivered for it,
// in order. It ends when the batch is full, on a status message (404 no
// messages and 408 request timeout end it without an error), Expires plus a
// second after the request, or when ctx ends.
func Fetch(ctx context.Context, nc *nats.Conn, apiPrefix, stream, consumer string, r Request) ([]jetstream.Msg, error) {
	var out []jetstream.Msg
	_, err := Pull(ctx, nc, apiPrefix, stream, consumer, r, func(m jetstream.Msg) { out = append(out, m) })
	return out, err
}

// Pull is Fetch handing each stored message to each as it arrives (a
// follower acts on it at once, not when the pull ends); n is how many.
func Pull(ctx context.Context, nc *nats.Conn, apiPrefix, stream, consumer string, r Request, each func(jetstream.Msg)) (n int, err error) {
	if r.Batch <= 0 {
		return 0, nil
	}
	body := struct {
		Batch    int   `json:"batch"`
		MaxBytes int   `json:"max_bytes,omitempty"`
		Expires  int64 `json:"expires,omitempty"`
		NoWait   bool  `json:"no_wait,omitempty"`
	}{r.Batch, r.MaxBytes, int64(r.Expires), r.NoWait}
	req, err := json.Marshal(body)
	if err != nil {
		return 0, err
	}
	inbox := nc.NewInbox()
	ch := make(chan *nats.Msg, 2*r.Batch+1)
	sub, err := nc.ChanSubscribe(inbox, ch)
	if err != nil {
		return 0, err
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := nc.PublishRequest(apiPrefix+"CONSUMER.MSG.NEXT."+stream+"."+consumer, inbox, req); err != nil {
		return 0, err
	}
	// The timer bounds a pull gone quiet, so it restarts with every message:
	// one timer for the whole pull, firing while messages waited in ch (a
	// paused process, a slow each), dropped messages the server had counted
	// delivered — a cancel never seen again, a job back only after the ack
	// wait with an attempt used (this session's review). Ending on the timer
	// or ctx, the messages already sent are taken first (drain).
	quiet := r.Expires + time.Second
	timer := time.NewTimer(quiet)
	defer timer.Stop()
	bytes := 0
	// take handles m; done says the pull is over (err: how).
	take := func(m *nats.Msg) (done bool, err error) {
		if !strings.HasPrefix(m.Reply, ackPrefix) {
			switch status, desc := m.Header.Get("Status"), m.Header.Get("Description"); {
			case status == "100":
				return false, nil // a heartbeat or flow control
			case status == "404", status == "408", endsBatch(status, desc):
				return true, nil
			default:
				return true, fmt.Errorf("%w: %s %s", ErrStatus, status, desc)
			}
		}
		n++
		each(Msg{m})
		bytes += m.Size()
		return n == r.Batch || (r.MaxBytes > 0 && bytes >= r.MaxBytes), nil
	}
	drain := func() error {
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		_ = nc.FlushWithContext(fctx) // the server's PONG comes after all it sent
		for {
			select {
			case m := <-ch:
				if done, err := take(m); done {
					return err
				}
			default:
				return nil
			}
		}
	}
	for {
		select {
		case <-ctx.Done():
			if err := drain(); err != nil {
				return n, err
			}
			return n, ctx.Err()
		case <-timer.C:
			return n, drain()
		case m := <-ch:
			if done, err := take(m); done {
				return n, err
			}
			if !timer.Stop() {
				select {
				case <-timer.C:
				default:
				}
			}
			timer.Reset(quiet)
		}
	}
}

// endsBatch reports whether a 409 status ends a pull as a matter of course:
// the next message would pass the pull's max bytes, or the batch is done.
func endsBatch(status, desc string) bool {
	d := strings.ToLower(desc)
	return status == "409" && (strings.Contains(d, "exceeds maxbytes") || strings.Contains(d, "batch completed"))
}

// Msg is a message a consumer delivered from its stream, as a jetstream.Msg:
// metadata from its reply subject, acknowledgements published there.
type Msg struct{ m *nats.Msg }

var _ jetstream.Msg = Msg{}

// Metadata parses the delivery's reply subject.
func (s Msg) Metadata() (*jetstream.MsgMetadata, error) {
	md, err := s.m.Metadata()
	if err != nil {
		return nil, err
	}
	out := &jetstream.MsgMetadata{
		NumDelivered: md.NumDelivered, NumPending: md.NumPending, Timestamp: md.Timestamp,
		Stream: md.Stream, Consumer: md.Consumer, Domain: md.Domain,
	}
	out.Sequence.Stream, out.Sequence.Consumer = md.Sequence.Stream, md.Sequence.Consumer
	return out, nil
}

// Data is the stored body.
func (s Msg) Data() []byte { return s.m.Data }

// Headers are the stored headers.
func (s Msg) Headers() nats.Header { return s.m.Header }

// Subject is the stored subject.
func (s Msg) Subject() string { return s.m.Subject }

// Reply is the delivery's $JS.ACK subject.
func (s Msg) Reply() string { return s.m.Reply }

// Ack acknowledges the delivery.
func (s Msg) Ack() error { return s.m.Ack() }

// DoubleAck acknowledges the delivery and waits for the server's answer.
func (s Msg) DoubleAck(ctx context.Context) error { return s.m.AckSync(nats.Context(ctx)) }

// Nak hands the delivery back for redelivery.
func (s Msg) Nak() error { return s.m.Nak() }

// NakWithDelay hands it back to be redelivered after delay.
func (s Msg) NakWithDelay(delay time.Duration) error { return s.m.NakWithDelay(delay) }

// InProgress restarts the delivery's ack wait.
func (s Msg) InProgress() error { return s.m.InProgress() }

// Term tells the server never to deliver the message again.
func (s Msg) Term() error { return s.m.Term() }

// TermWithReason is Term with a reason the server passes on in its advisory.
func (s Msg) TermWithReason(reason string) error {
	return s.m.Respond([]byte("+TERM " + reason))
}
