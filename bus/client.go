package bus

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jserr"
	"github.com/mlx-serving/mlx-serving/internal/jsget"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/mlx-serving/mlx-serving/tracing"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// Client submits jobs, cancels them and fetches their results. Backend services
// build one per process and share it; it is safe for concurrent use.
type Client struct {
	nc              *nats.Conn
	js              jetstream.JetStream
	tenant          string
	defaultModel    string
	defaultPriority string
	publishTimeout  time.Duration
	log             zerolog.Logger
	now             func() time.Time
	noModelCheck    bool
	models          modelCheck
}

// ClientOption configures a Client.
type ClientOption func(*Client)

// WithTenant sets the tenant of jobs and cancels that do not name one; it is also
// the tenant token of default reply subjects.
func WithTenant(tenant string) ClientOption { return func(p *Client) { p.tenant = tenant } }

// WithDefaultModel sets the model of jobs that do not name one.
func WithDefaultModel(model string) ClientOption {
	return func(p *Client) { p.defaultModel = model }
}

// WithDefaultPriority sets the priority of jobs that do not name one (default normal).
func WithDefaultPriority(priority string) ClientOption {
	return func(p *Client) { p.defaultPriority = priority }
}

// WithPublishTimeout bounds each publish when the caller's ctx has a later or no
// deadline (default 5s).
func WithPublishTimeout(d time.Duration) ClientOption {
	return func(p *Client) { p.publishTimeout = d }
}

// WithClientLogger sets the logger for submit and cancel events (debug level).
func WithClientLogger(l zerolog.Logger) ClientOption { return func(p *Client) { p.log = l } }

// WithoutModelCheck queues jobs for any model. By default Submit refuses, with
// ErrModelNotServed, a job whose model no worker has served within the model
// grace period while workers serve others (while none serves anything, the
// fleet is down and jobs are queued to wait for it); with this option the job
// is queued and the dispatcher dead-letters it if no worker comes for it.
func WithoutModelCheck() ClientOption { return func(p *Client) { p.noModelCheck = true } }

// WithClock replaces time.Now, for tests.
func WithClock(now func() time.Time) ClientOption { return func(p *Client) { p.now = now } }

// NewClient builds a Client on an open connection.
func NewClient(nc *nats.Conn, opts ...ClientOption) (*Client, error) {
	if nc == nil {
		return nil, fmt.Errorf("bus: NewClient: %w", ErrNotConnected)
	}
	js, err := NewJetStream(nc)
	if err != nil {
		return nil, fmt.Errorf("bus: jetstream: %w", err)
	}
	p := &Client{
		nc:              nc,
		js:              js,
		defaultPriority: schemas.PriorityNormal,
		publishTimeout:  5 * time.Second,
		now:             time.Now,
	}
	for _, o := range opts {
		o(p)
	}
	return p, nil
}

// JetStream returns the client's JetStream context.
func (p *Client) JetStream() jetstream.JetStream { return p.js }

// ReplySubject is the reply subject Submit gives a job of this client's tenant
// that names none; subscribe to it before Submit to see every token event.
func (p *Client) ReplySubject(jobID string) string { return ReplySubject(p.tenant, jobID) }

// SubmitAck describes a queued job.
type SubmitAck struct {
	JobID    string
	Subject  string // where the job was published: mlx.jobs.<tenant>.<priority>.<id>
	ReplyTo  string // where its token events and terminal event will arrive
	Stream   string
	Sequence uint64 // the job's sequence in JOBS (the earlier one's, for a duplicate)
}

// Submit validates and queues a job. It fills the job's defaults in place (id,
// tenant, model, priority, reply_to, created_at), so the caller sees them.
//
// Errors: a *schemas.ValidationError, unchanged, when the job breaks its schema
// (nothing is published); ErrDuplicate when the id is already queued, running or
// finished; ErrModelNotServed when workers are up and none has served the
// job's model within the grace period (WithoutModelCheck turns this off);
// ErrQueueFull when JOBS is at its limits; ErrJobTooLarge; ErrNoStream
// when JOBS is not provisioned; ErrNotConnected. All are matched with errors.Is.
func (p *Client) Submit(ctx context.Context, job *schemas.JobRequest) (ack SubmitAck, err error) {
	if job == nil {
		return SubmitAck{}, errors.New("bus: Submit: nil job")
	}
	p.fillDefaults(job)
	fresh := minted.take(job.ID)
	ctx, span := tracing.Tracer().Start(ctx, tracing.SpanSubmit, trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithAttributes(attribute.String(tracing.AttrJobID, job.ID), attribute.String(tracing.AttrModel, job.Model)))
	defer func() { endSpan(span, err) }()
	ctx, cancel := p.withTimeout(ctx)
	defer cancel()
	// The checks' round trip overlaps the validation (they only read; an
	// invalid job is refused whatever they find).
	admitted := make(chan error, 1)
	go func() { admitted <- p.admit(ctx, job, fresh) }()
	msg, ack, err := p.prepare(job)
	if err != nil {
		return ack, notSubmitted(err)
	}
	if err := <-admitted; err != nil {
		return ack, notSubmitted(err)
	}
	// Ended before the publish: say so, or the caller must take the job for
	// possibly stored and cancel it — a cancel kept a day for a job that never
	// comes (the gateway stored one for 18% of requests whose clients left
	// this early, red team round 19, second pass).
	if err := ctx.Err(); err != nil {
		return ack, notSubmitted(err)
	}
	// The trace context rides in the headers, not the job: the job's schema is
	// the clients' contract and stays free of transport concerns.
	tracing.InjectHeader(ctx, msg.Header)
	pa, err := p.js.PublishMsg(ctx, msg, jetstream.WithExpectStream(subjects.StreamJobs))
	return p.published(ack, pa, err)
}

// notSubmitted marks err, which ended a submit before its publish, as
// ErrNotSubmitted, unless it already says what refused the job (invalid, a
// duplicate, a model nobody serves, too large, not permitted). Every other
// failure there — an ended context, no connection, a RESULTS lookup that
// failed — left nothing stored, and the caller must be told so: before, a
// lookup failing mid-restart ("check results: no stream", "not connected")
// said neither, and a caller had to take the job for possibly queued (red
// team round 23, the operator's campaign: 10 such submits).
func notSubmitted(err error) error {
	switch {
	case err == nil, errors.Is(err, ErrNotSubmitted), errors.Is(err, schemas.ErrInvalid), errors.Is(err, ErrDuplicate),
		errors.Is(err, ErrModelNotServed), errors.Is(err, ErrJobTooLarge), errors.Is(err, ErrPermissionDenied):
		return err
	}
	return fmt.Errorf("%w: %w", ErrNotSubmitted, err)
}

// prepare encodes and validates job (defaults filled): the message to publish
// and the ack as far as it is known. Nothing touches the network.
func (p *Client) prepare(job *schemas.JobRequest) (*nats.Msg, SubmitAck, error) {
	data, err := schemas.Marshal(schemas.Job, job)
	if err != nil {
		return nil, SubmitAck{}, err
	}
	if err := schemas.Validate(schemas.Job, data); err != nil {
		return nil, SubmitAck{}, err
	}
	// The id and priority become subject tokens; a schema that allows more than a
	// subject can carry must not let a job land on the wrong subject.
	if verr := p.subjectViolations(job); verr != nil {
		return nil, SubmitAck{}, verr
	}
	if mp := p.nc.MaxPayload(); mp > 0 && int64(len(data)) > mp-schemas.JobHeadroom {
		// Stored, it could never reach a worker: an assignment carries it
		// with more around it (schemas.JobHeadroom).
		return nil, SubmitAck{}, fmt.Errorf("bus: submit %s: %w: it encodes to %d bytes, and a job on this bus may take %d",
			job.ID, ErrJobTooLarge, len(data), mp-schemas.JobHeadroom)
	}
	ack := SubmitAck{JobID: job.ID, Subject: subjects.Job(job.Tenant, job.Priority, job.ID), ReplyTo: job.ReplyTo}
	if p.nc.IsClosed() || !p.nc.IsConnected() {
		return nil, ack, fmt.Errorf("bus: submit %s: %w (status %s)", job.ID, ErrNotConnected, p.nc.Status())
	}
	// No Nats-Msg-Id: the duplicate window is shared by every tenant, so a job
	// id used as one would let a tenant shadow another's later submit of the same
	// id. A job still queued or running is refused by the expectation below, a
	// finished one by admit's RESULTS check, and a resubmission that slips
	// between the two is acked without running by the dispatcher (it finds the
	// record).
	//
	// The expectation: nothing is stored yet under the job's subject at ANY
	// priority. The priority is a token of the job subject, so the stream's
	// one-message-per-subject limit alone accepted the same id once per
	// priority, and two dispatchers then ran both as attempt 1, mixing two runs
	// on the caller's stream. The server checks the last message of the
	// wildcard subject (mlx.jobs.<tenant>.*.<id>) and refuses with "wrong last
	// sequence", which mapSubmitError reports as ErrDuplicate. A raw publisher
	// that skips the header is still caught by the dispatcher (it terminates a
	// second message of a job it holds).
	return &nats.Msg{Subject: ack.Subject, Data: data, Header: jsprov.NewJobHeader(job.Tenant, job.ID)}, ack, nil
}

// admit makes the checks a job must pass before it is published: not finished
// already (unless its id was minted here just now: fresh, see minted), and
// (unless turned off) a model some worker serves.
func (p *Client) admit(ctx context.Context, job *schemas.JobRequest, fresh bool) error {
	// A finished job's id is refused for as long as RESULTS keeps its record, not
	// only within the duplicate window.
	if !fresh {
		if _, err := results.Fetch(ctx, p.js, job.Tenant, job.ID); err == nil {
			return fmt.Errorf("bus: submit %s: %w: job already has a result", job.ID, ErrDuplicate)
		} else if !errors.Is(err, ErrNoResult) {
			return fmt.Errorf("bus: submit %s: check results: %w", job.ID, err)
		}
	}
	if !p.noModelCheck {
		if err := p.models.check(ctx, p.js, job.Model, p.now()); err != nil {
			return fmt.Errorf("bus: submit %s: %w", job.ID, err)
		}
	}
	return nil
}

// published completes ack from JetStream's answer to a job's publish.
func (p *Client) published(ack SubmitAck, pa *jetstream.PubAck, err error) (SubmitAck, error) {
	if err != nil {
		if why := deniedOn(p.nc, ack.Subject); why != nil {
			return ack, fmt.Errorf("bus: submit %s: %w: %w", ack.JobID, ErrPermissionDenied, why)
		}
		return ack, p.mapSubmitError(ack.JobID, err)
	}
	ack.Stream, ack.Sequence = pa.Stream, pa.Sequence
	if pa.Duplicate {
		return ack, fmt.Errorf("bus: submit %s: %w", ack.JobID, ErrDuplicate)
	}
	p.log.Debug().Str("job_id", ack.JobID).Str("subject", ack.Subject).Uint64("seq", pa.Sequence).Msg("job submitted")
	return ack, nil
}

func endSpan(span trace.Span, err error) {
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, "submit failed")
	}
	span.End()
}

func (p *Client) mapSubmitError(jobID string, err error) error {
	switch jserr.StoreRefusal(err) {
	case jserr.StoreMaxMsgs, jserr.StoreMaxBytes:
		return fmt.Errorf("bus: submit %s: %w: %w", jobID, ErrQueueFull, err)
	case jserr.StoreMsgTooLarge:
		return fmt.Errorf("bus: submit %s: %w: %w", jobID, ErrJobTooLarge, err)
	}
	if jserr.IsAlreadyStored(err) {
		// The job's id is stored already, at this priority or another one
		// (prepare's expectation, or the per-subject limit): queued or running.
		return fmt.Errorf("bus: submit %s: %w: job is already queued", jobID, ErrDuplicate)
	}
	if ae, ok := jserr.APIError(err); ok {
		switch ae.ErrorCode {
		case jserr.CodeInsufficientResources:
			// Not the queue's limits but the server's whole JetStream store
			// (max_store or the disk): said so, or an operator looks at JOBS.
			return fmt.Errorf("bus: submit %s: %w: the server's JetStream store is full (max_store or disk), not the queue: %w", jobID, ErrQueueFull, err)
		case jserr.CodeMessageExceedsMaximum:
			return fmt.Errorf("bus: submit %s: %w: %w", jobID, ErrJobTooLarge, err)
		}
	}
	if errors.Is(err, nats.ErrMaxPayload) {
		return fmt.Errorf("bus: submit %s: %w: %w", jobID, ErrJobTooLarge, err)
	}
	if (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout)) && !p.nc.IsConnected() {
		return fmt.Errorf("bus: submit %s: %w: %w", jobID, ErrNotConnected, err)
	}
	return jserr.Map(err, "submit "+jobID)
}

// Cancel asks for a job to be cancelled. The request is stored in CANCELS, so a
// job that is still queued is dropped when it is pulled.
func (p *Client) Cancel(ctx context.Context, jobID, reason string) error {
	return p.TenantCancel(ctx, p.tenant, jobID, reason)
}

// TenantCancel asks for a job of tenant ("" is the default tenant) to be
// cancelled, for a client that submits for several (the gateway). A client
// credential may cancel its own tenant's jobs only.
func (p *Client) TenantCancel(ctx context.Context, tenant, jobID, reason string) error {
	msg := schemas.CancelMsg{JobID: jobID, Reason: reason, Tenant: tenant, RequestedAt: p.now().UTC()}
	data, err := json.Marshal(msg)
	if err != nil {
		return fmt.Errorf("bus: marshal cancel %s: %w", jobID, err)
	}
	if err := schemas.Validate(schemas.Cancel, data); err != nil {
		return err
	}
	if !validSubjectToken(jobID) {
		return &schemas.ValidationError{Code: schemas.Code(schemas.Cancel), Type: schemas.Cancel,
			Violations: []schemas.Violation{{Path: "$.job_id", Reason: "must be one subject token: no '.', '*', '>' or whitespace"}}}
	}
	if p.nc.IsClosed() || !p.nc.IsConnected() {
		return fmt.Errorf("bus: cancel %s: %w (status %s)", jobID, ErrNotConnected, p.nc.Status())
	}
	ctx, cancel := p.withTimeout(ctx)
	defer cancel()
	if _, err := p.js.Publish(ctx, subjects.Cancel(tenant, jobID), data, jetstream.WithExpectStream(subjects.StreamCancels)); err != nil {
		if why := deniedOn(p.nc, subjects.Cancel(tenant, jobID)); why != nil {
			return fmt.Errorf("bus: cancel %s: %w: %w", jobID, ErrPermissionDenied, why)
		}
		return jserr.Map(err, "cancel "+jobID)
	}
	p.log.Debug().Str("job_id", jobID).Str("reason", reason).Msg("cancel requested")
	return nil
}

// Result returns the terminal record of a job of the client's tenant, or an
// error matching ErrNoResult.
func (p *Client) Result(ctx context.Context, jobID string) (*schemas.ResultMsg, error) {
	return p.TenantResult(ctx, p.tenant, jobID)
}

// TenantResult returns the terminal record of a job of tenant ("" is the default
// tenant), for a client that submits for several (the gateway). A client
// credential may read its own tenant's records only.
func (p *Client) TenantResult(ctx context.Context, tenant, jobID string) (*schemas.ResultMsg, error) {
	ctx, cancel := p.withTimeout(ctx)
	defer cancel()
	r, err := results.Fetch(ctx, p.js, tenant, jobID)
	if err != nil && !errors.Is(err, ErrNoResult) {
		// A read of another tenant's record is refused like a submit: with an
		// asynchronous violation on the direct get's subject and no answer.
		read := jsget.APIPrefix(p.js) + "DIRECT.GET." + subjects.StreamResults + "." + subjects.Result(tenant, jobID)
		if why := deniedOn(p.nc, read); why != nil {
			return nil, fmt.Errorf("bus: result %s: %w: %w", jobID, ErrPermissionDenied, why)
		}
	}
	return r, err
}

func (p *Client) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if p.publishTimeout <= 0 {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, p.publishTimeout)
}

func (p *Client) fillDefaults(job *schemas.JobRequest) {
	if job.ID == "" {
		job.ID = NewJobID()
	}
	if job.Tenant == "" {
		job.Tenant = p.tenant
	}
	if job.Model == "" {
		job.Model = p.defaultModel
	}
	if job.Priority == "" {
		job.Priority = p.defaultPriority
	}
	if job.ReplyTo == "" {
		job.ReplyTo = ReplySubject(job.Tenant, job.ID)
	}
	if job.CreatedAt == nil {
		now := p.now().UTC()
		job.CreatedAt = &now
	}
}

// subjectViolations checks what becomes a subject token, and that the job stays
// inside its tenant: the body's tenant is the client's (when it has one), and
// reply_to lies under that tenant's reply namespace. The server's permissions and
// the dispatcher enforce the same; this says it at the edge, with the path.
func (p *Client) subjectViolations(job *schemas.JobRequest) error {
	vs := tokenViolations(job)
	if p.tenant != "" && job.Tenant != p.tenant {
		vs = append(vs, schemas.Violation{Path: "$.tenant", Reason: "must be the producer's tenant " + strconv.Quote(p.tenant)})
	} else if !subjects.ReplyInTenant(job.Tenant, job.ReplyTo) {
		vs = append(vs, schemas.Violation{Path: "$.reply_to", Reason: "must be a subject under " + subjects.ReplyNamespace(job.Tenant)})
	}
	if len(vs) == 0 {
		return nil
	}
	return &schemas.ValidationError{Code: schemas.Code(schemas.Job), Type: schemas.Job, Violations: vs}
}

func tokenViolations(job *schemas.JobRequest) []schemas.Violation {
	var vs []schemas.Violation
	const reason = "must be one subject token: no '.', '*', '>' or whitespace"
	if !validSubjectToken(job.ID) {
		vs = append(vs, schemas.Violation{Path: "$.id", Reason: reason})
	}
	known := false
	for _, pr := range schemas.Priorities {
		known = known || job.Priority == pr
	}
	if !known {
		vs = append(vs, schemas.Violation{Path: "$.priority", Reason: "must be one of " + strings.Join(schemas.Priorities, ", ")})
	}
	if job.Tenant != "" && !validSubjectToken(job.Tenant) {
		vs = append(vs, schemas.Violation{Path: "$.tenant", Reason: reason})
	}
	return vs
}

func validSubjectToken(s string) bool {
	return s != "" && !strings.ContainsAny(s, ".*> \t\r\n")
}

// crockford is the ULID alphabet.
const crockford = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

// newULID returns a new ULID: 26 characters, sortable by creation time (ms), 80
// random bits, safe as a subject token. Client-assigned ids sort by submission,
// which keeps `status` listings and RESULTS scans in time order.
func newULID() string {
	var b [16]byte
	ms := uint64(time.Now().UnixMilli())
	b[0], b[1], b[2], b[3], b[4], b[5] = byte(ms>>40), byte(ms>>32), byte(ms>>24), byte(ms>>16), byte(ms>>8), byte(ms)
	_, _ = rand.Read(b[6:]) // crypto/rand.Read never fails (Go 1.24+)
	hi, lo := binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])
	var out [26]byte
	for i := 25; i >= 0; i-- {
		out[i] = crockford[lo&31]
		lo = lo>>5 | hi<<59
		hi >>= 5
	}
	return string(out[:])
}
