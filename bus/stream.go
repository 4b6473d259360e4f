package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"iter"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jserr"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// ErrStreamEnded is returned by JobStream.Next after the terminal event was
// delivered, or after Close.
var ErrStreamEnded = errors.New("bus: job stream ended")

// StreamOptions tunes a JobStream. The zero value is a sensible default.
type StreamOptions struct {
	// QuietAfter is how long the stream may stay silent before RESULTS is checked
	// for a terminal record that never arrived on the reply subject (the
	// subscriber was disconnected, or the buffer overflowed). Queued jobs are
	// silent too, so each check is one cheap lookup; default 5s.
	QuietAfter time.Duration
	// PendingMsgs and PendingBytes bound what the stream holds that its reader
	// has not taken (replyqueue.go). A reader that keeps up holds a few events;
	// past the bounds events are dropped, the caller's text is completed from
	// the record (Event.Rest) and a dropped terminal is read from RESULTS, so a
	// drop never loses the job's end. Defaults: DefaultPendingMsgs, and
	// DefaultPendingPayloads times the connection's max payload (4 MiB at NATS's
	// default 1 MiB).
	PendingMsgs, PendingBytes int
	// FinalLookup bounds the RESULTS lookup made when the caller's ctx ends, so a
	// terminal that was written but not seen is still handed over; default 2s.
	FinalLookup time.Duration
}

// The default bounds of a stream's queue. What one job sends is bounded by
// its record: its events carry the record's text and logprobs (at most one max
// payload), each in an envelope of about 100 bytes, and its terminal event is
// at most one max payload more. Four max payloads hold all of that for any
// but the longest jobs, so only a reader stopped for most of a job drops
// anything; a stopped reader (a gateway handler blocked writing to a client
// that does not read, until gateway_write_timeout) holds at most that.
// It was 65,536 messages and 64 MiB: red team round 12 (F1) filled 64 MiB per
// held stream with direct-get answers published onto its own reply subjects.
const (
	DefaultPendingMsgs     = 8192
	DefaultPendingPayloads = 4
	defaultMaxPayload      = 1 << 20 // NATS's, when the connection does not say
)

func (o StreamOptions) withDefaults(maxPayload int64) StreamOptions {
	if o.QuietAfter <= 0 {
		o.QuietAfter = 5 * time.Second
	}
	if o.PendingMsgs <= 0 {
		o.PendingMsgs = DefaultPendingMsgs
	}
	if o.PendingBytes <= 0 {
		if maxPayload <= 0 {
			maxPayload = defaultMaxPayload
		}
		o.PendingBytes = int(min(DefaultPendingPayloads*maxPayload, 1<<30))
	}
	if o.FinalLookup <= 0 {
		o.FinalLookup = 2 * time.Second
	}
	return o
}

// JobStream reads one job's events from its reply subject. It delivers exactly
// one terminal event: the first result seen on the reply subject, or the RESULTS
// record when the stream goes quiet or the caller's ctx ends. Next and Events
// are for one goroutine; Close may be called from any.
type JobStream struct {
	tenant  string // whose RESULTS record the stream falls back to
	jobID   string
	replyTo string
	js      jetstream.JetStream
	sub     *nats.Subscription
	q       *replyQueue // what sub received and Next has not read (replyqueue.go)
	opts    StreamOptions

	attempt int // latest attempt seen; 0 before the first event
	next    int // seq expected next within attempt
	textLen int // where the latest token event's text ends in the job's text
	text    textTracker
	missed  int
	done    bool

	lookupFirst bool // Watch: the job may have finished before we subscribed

	closeOnce sync.Once
	closed    atomic.Bool
}

// NewJobID returns a fresh job id (a ULID, as Submit assigns), for callers that
// need the id before submitting.
func NewJobID() string { return minted.add(newULID()) }

// OpenStream prepares job for submission and subscribes to its reply subject, so
// no event is lost however fast a worker answers (core NATS delivers only to
// subscriptions that exist). It fills job.ID and job.ReplyTo when empty; submit
// the job afterwards (Client.Submit) and Close the stream if that fails. js may
// be nil, in which case one is made from nc.
func OpenStream(ctx context.Context, nc *nats.Conn, js jetstream.JetStream, job *schemas.JobRequest, opts StreamOptions) (*JobStream, error) {
	if job == nil {
		return nil, errors.New("bus: open stream: nil job")
	}
	if job.ID == "" {
		job.ID = NewJobID()
	}
	if job.ReplyTo == "" {
		job.ReplyTo = ReplySubject(job.Tenant, job.ID)
	}
	return subscribe(ctx, nc, js, job.Tenant, job.ID, job.ReplyTo, opts, true)
}

// Watch subscribes to the reply subject of a job that may already be submitted,
// running or finished, e.g. by a caller that restarted. The first Next checks
// RESULTS at once, so a job that finished meanwhile yields its record without
// waiting for the stream to go quiet. tenant is the job's ("" is the default
// tenant): its RESULTS record lives under it.
func Watch(ctx context.Context, nc *nats.Conn, js jetstream.JetStream, tenant, jobID, replyTo string, opts StreamOptions) (*JobStream, error) {
	s, err := subscribe(ctx, nc, js, tenant, jobID, replyTo, opts, true)
	if err != nil {
		return nil, err
	}
	s.lookupFirst = true
	return s, nil
}

// flushTimeout bounds the round trip that makes a new subscription known.
const flushTimeout = 10 * time.Second

// subscribe listens on replyTo. flush makes the server know the interest
// before it returns: needed when the job is (or was) published on another
// connection, whose messages the server may handle before this one's SUB.
func subscribe(ctx context.Context, nc *nats.Conn, js jetstream.JetStream, tenant, jobID, replyTo string, opts StreamOptions, flush bool) (*JobStream, error) {
	if err := results.CheckJobID(jobID); err != nil {
		return nil, err
	}
	if !validSubjectToken(strings.ReplaceAll(replyTo, ".", "_")) {
		// A wildcard reply subject would take other jobs' events for this one's.
		return nil, &schemas.ValidationError{Code: schemas.Code(schemas.Job), Type: schemas.Job,
			Violations: []schemas.Violation{{Path: "$.reply_to", Reason: "must be a subject without wildcards or whitespace"}}}
	}
	if nc == nil {
		return nil, fmt.Errorf("bus: watch %s: %w", jobID, ErrNotConnected)
	}
	if nc.IsClosed() {
		return nil, fmt.Errorf("bus: watch %s: %w", jobID, ErrNotConnected)
	}
	if js == nil {
		var err error
		if js, err = NewJetStream(nc); err != nil {
			return nil, fmt.Errorf("bus: watch %s: %w", jobID, err)
		}
	}
	opts = opts.withDefaults(nc.MaxPayload())
	q := newReplyQueue(opts.PendingMsgs, opts.PendingBytes, ownEvent(jobID, replyTo))
	sub, err := nc.Subscribe(replyTo, q.push)
	if err != nil {
		return nil, fmt.Errorf("bus: subscribe %s: %w", replyTo, err)
	}
	sub.SetClosedHandler(func(string) { q.end() })
	if err := sub.SetPendingLimits(opts.PendingMsgs, opts.PendingBytes); err != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("bus: subscribe %s: %w", replyTo, err)
	}
	// The server must know the interest before the job can reach a worker; the
	// flush makes that true for this server. Other servers of a cluster learn it
	// asynchronously, but a job's way through JetStream, a dispatcher and a
	// worker's prefill takes far longer.
	if !flush {
		return &JobStream{tenant: tenant, jobID: jobID, replyTo: replyTo, js: js, sub: sub, q: q, opts: opts}, nil
	}
	fctx, cancel := ctx, context.CancelFunc(func() {})
	if _, ok := ctx.Deadline(); !ok {
		// FlushWithContext insists on a deadline; a caller's stream may have none.
		fctx, cancel = context.WithTimeout(ctx, flushTimeout)
	}
	err = nc.FlushWithContext(fctx)
	cancel()
	if err != nil {
		_ = sub.Unsubscribe()
		if jserr.IsDisconnected(err) {
			return nil, fmt.Errorf("bus: subscribe %s: %w: %v", replyTo, ErrNotConnected, err)
		}
		return nil, fmt.Errorf("bus: subscribe %s: %w", replyTo, err)
	}
	// The flush's PONG follows the server's answer to the SUB: a refused one
	// has been reported by now. Without this a watch of another tenant's job
	// waited for its context, for ever with none (round 22).
	if why := deniedOn(nc, replyTo); why != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("bus: subscribe %s: %w: %w", replyTo, ErrPermissionDenied, why)
	}
	return &JobStream{tenant: tenant, jobID: jobID, replyTo: replyTo, js: js, sub: sub, q: q, opts: opts}, nil
}

// ownEvent screens what reaches job jobID's queue: a token or result event of
// that job, published on replyTo. Next and accept check the same again; doing
// it on arrival keeps anything else from taking room in the queue (see
// replyQueue). The probe parses the message once more; one that is not JSON
// fails fast, and token events are small.
func ownEvent(jobID, replyTo string) func(*nats.Msg) bool {
	return func(m *nats.Msg) bool {
		if m.Subject != replyTo {
			return false // pushed here by a JetStream consumer, not published: see worker.onlyOn
		}
		var probe struct {
			Type  string `json:"type"`
			JobID string `json:"job_id"`
		}
		if json.Unmarshal(m.Data, &probe) != nil || probe.JobID != jobID {
			return false
		}
		return probe.Type == "token" || probe.Type == "result"
	}
}

// SubmitStream opens the stream for job on nc (the connection p was built on),
// submits the job with p and returns both. On a submit error the stream is
// closed and the error is Submit's own (a *schemas.ValidationError,
// ErrQueueFull, ErrDuplicate, ...).
func SubmitStream(ctx context.Context, p *Client, nc *nats.Conn, job *schemas.JobRequest, opts StreamOptions) (*JobStream, SubmitAck, error) {
	if job == nil {
		return nil, SubmitAck{}, errors.New("bus: submit stream: nil job")
	}
	if job.ID == "" {
		job.ID = NewJobID()
	}
	if job.Tenant == "" {
		job.Tenant = p.tenant // what Submit would fill: the stream's RESULTS fallback needs it
	}
	if job.ReplyTo == "" {
		job.ReplyTo = ReplySubject(job.Tenant, job.ID)
	}
	// On the client's own connection the SUB needs no round trip of its own: a
	// server handles one connection's messages in order, so it knows the
	// interest before it stores the job the publish below carries, and no
	// worker can answer a job that is not stored. (One round trip less to the
	// first token.) On another connection that order does not hold: flush.
	s, err := subscribe(ctx, nc, p.JetStream(), job.Tenant, job.ID, job.ReplyTo, opts, nc != p.nc)
	if err != nil {
		return nil, SubmitAck{}, notSubmitted(err)
	}
	ack, err := p.Submit(ctx, job)
	if err != nil {
		s.Close()
		return nil, ack, err
	}
	return s, ack, nil
}

// JobID is the id of the job the stream follows.
func (s *JobStream) JobID() string { return s.jobID }

// ReplyTo is the subject the stream listens on.
func (s *JobStream) ReplyTo() string { return s.replyTo }

// Missed is the total of events known lost so far.
func (s *JobStream) Missed() int { return s.missed }

// Text is the text the caller has been given so far: every Token.Delta and
// the terminal's Rest, after each event's Drop. After the terminal event it is
// Result.Text.
func (s *JobStream) Text() string { return string(s.text.given.text) }

// Logprobs are the entries that came with Text, in order (the caller must not
// modify them). After a terminal event whose Rest is not empty they lack the
// entries of the lost events; Result.Logprobs is the record's copy.
func (s *JobStream) Logprobs() []schemas.TokenLogprob { return s.text.given.entries }

// Close stops listening. It does not cancel the job.
func (s *JobStream) Close() {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		_ = s.sub.Unsubscribe()
	})
}

// Next returns the next event. After the terminal event it returns
// ErrStreamEnded. When ctx ends before a terminal was seen, the buffered events
// and RESULTS are checked one last time for the terminal; if the job has none
// yet, ctx's error is returned (buffered deltas are dropped then, and the
// stream remains usable with a fresh ctx).
func (s *JobStream) Next(ctx context.Context) (Event, error) {
	if s.done {
		return Event{}, ErrStreamEnded
	}
	if s.lookupFirst {
		s.lookupFirst = false
		if ev, ok, err := s.lookup(ctx); err == nil && ok {
			return ev, nil
		}
	}
	for {
		if err := ctx.Err(); err != nil {
			return s.lastLookup(ctx, err)
		}
		waitCtx, cancel := context.WithTimeout(ctx, s.opts.QuietAfter)
		msg, err := s.q.next(waitCtx)
		cancel()
		switch {
		case err == nil:
			if msg.Subject != s.replyTo {
				continue // pushed here by a JetStream consumer, not published: see worker.onlyOn
			}
			ev, ok := s.accept(msg.Data)
			if !ok {
				continue
			}
			if ev.Terminal() {
				if ev, ok = s.confirm(ctx, ev); !ok {
					continue
				}
				s.finish()
			}
			return ev, nil
		case errors.Is(err, nats.ErrSlowConsumer):
			// Events were dropped; the seq numbering shows how many on the next one.
			continue
		case ctx.Err() != nil:
			return s.lastLookup(ctx, ctx.Err())
		case errors.Is(err, context.DeadlineExceeded):
			// Quiet: a job still queued or a terminal that was missed. A failed
			// lookup (say, while reconnecting) is retried at the next quiet period;
			// a connection gone for good ends the wait below.
			if ev, ok, lerr := s.lookup(ctx); lerr == nil && ok {
				return ev, nil
			}
		case errors.Is(err, nats.ErrBadSubscription), errors.Is(err, nats.ErrConnectionClosed):
			if s.closed.Load() {
				return Event{}, ErrStreamEnded
			}
			// The connection is gone for good: RESULTS cannot be read either.
			return Event{}, fmt.Errorf("bus: job %s stream: %w: %v", s.jobID, ErrNotConnected, err)
		default:
			return Event{}, fmt.Errorf("bus: job %s stream: %w", s.jobID, err)
		}
	}
}

// Events ranges over the stream's events until and including the terminal one.
// An error ends the sequence after being yielded once.
func (s *JobStream) Events(ctx context.Context) iter.Seq2[Event, error] {
	return func(yield func(Event, error) bool) {
		for {
			ev, err := s.Next(ctx)
			if errors.Is(err, ErrStreamEnded) {
				return
			}
			if err != nil {
				yield(Event{}, err)
				return
			}
			if !yield(ev, nil) || ev.Terminal() {
				return
			}
		}
	}
}

func (s *JobStream) finish() {
	s.done = true
	s.Close()
}
