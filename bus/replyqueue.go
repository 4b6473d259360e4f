package bus

import (
	"context"
	"sync"

	"github.com/nats-io/nats.go"
)

// replyQueue holds a job stream's events between the subscription's callback
// and the stream's reader, growing with what is pending.
//
// Why not SubscribeSync: nats.go gives a sync subscription a channel of
// Options.SubChanLen (65,536) slots, allocated up front — 512 KiB of pointers per
// stream whatever the job, which was most of what a held gateway request kept
// (red team round 11, F3: 1,000 streaming requests held half a GiB). An async
// subscription queues in a list; its callback moves each message here at once,
// so this slice holds what the reader has not taken yet, and nothing more.
//
// Bounded: past maxMsgs messages or maxBytes bytes pending, messages are
// dropped and the reader is told once (errDropped, as nats.ErrSlowConsumer told
// it); the stream's seq numbers show how many, and a dropped terminal is read
// from RESULTS once the stream goes quiet (JobStream.Next), so a drop costs
// deltas, never the job's end.
//
// keep, when set, screens each message before it is counted: a message that is
// not the job's own (another subject, another job, not a token or a result) is
// dropped on arrival and takes no room. Anything that can publish on the reply
// subject could otherwise fill the queue with messages the reader throws away
// (red team round 12, F1: a tenant had the server publish direct-get answers of
// its 178 KB records onto its own reply subjects, 64 MiB per stream).
type replyQueue struct {
	maxMsgs, maxBytes int
	keep              func(*nats.Msg) bool

	mu      sync.Mutex
	msgs    []*nats.Msg
	head    int // msgs[head:] are pending
	bytes   int
	dropped bool          // messages were dropped since the reader last heard
	closed  bool          // the subscription ended (unsubscribed, connection closed)
	ready   chan struct{} // a token when there may be something to read
}

func newReplyQueue(maxMsgs, maxBytes int, keep func(*nats.Msg) bool) *replyQueue {
	return &replyQueue{maxMsgs: maxMsgs, maxBytes: maxBytes, keep: keep, ready: make(chan struct{}, 1)}
}

// push is the subscription's callback.
func (q *replyQueue) push(m *nats.Msg) {
	if q.keep != nil && !q.keep(m) {
		return
	}
	q.mu.Lock()
	if len(q.msgs)-q.head >= q.maxMsgs || q.bytes+len(m.Data) > q.maxBytes {
		q.dropped = true
	} else {
		if q.head > 0 && q.head >= len(q.msgs)/2 {
			// Taken ones are half of it or more: move the pending down. Only
			// resetting once all were taken let the slice grow for a whole
			// stream when its reader never quite caught up.
			n := copy(q.msgs, q.msgs[q.head:])
			clear(q.msgs[n:])
			q.msgs, q.head = q.msgs[:n], 0
		}
		q.msgs = append(q.msgs, m)
		q.bytes += len(m.Data)
	}
	q.mu.Unlock()
	q.signal()
}

// end marks the subscription closed: once the pending messages are read, next
// reports nats.ErrBadSubscription.
func (q *replyQueue) end() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.signal()
}

func (q *replyQueue) signal() {
	select {
	case q.ready <- struct{}{}:
	default:
	}
}

// errDropped: messages were dropped (the queue was full) since the last read.
var errDropped = nats.ErrSlowConsumer

// take returns the next pending message, or why there is none: errDropped once
// after drops, nats.ErrBadSubscription when the subscription has ended, nil
// message and nil error when nothing is pending yet.
func (q *replyQueue) take() (*nats.Msg, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.dropped {
		q.dropped = false
		return nil, errDropped
	}
	if q.head < len(q.msgs) {
		m := q.msgs[q.head]
		q.msgs[q.head] = nil
		q.head++
		q.bytes -= len(m.Data)
		return m, nil
	}
	if q.closed {
		return nil, nats.ErrBadSubscription
	}
	return nil, nil
}

// next waits for the next message until ctx ends (returning ctx's error).
func (q *replyQueue) next(ctx context.Context) (*nats.Msg, error) {
	for {
		m, err := q.take()
		if m != nil || err != nil {
			return m, err
		}
		select {
		case <-q.ready:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}
