package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Endpoint labels for metrics and logs.
const (
	endpointChat        = "chat_completions"
	endpointCompletions = "completions"
	endpointModels      = "models"
)

// cancelTimeout bounds the cancel published for a job whose client left.
const cancelTimeout = 5 * time.Second

var jsonNull = json.RawMessage("null")

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
	// PromptTokensDetails is OpenAI's shape: cached_tokens of prompt_tokens came from
	// the runtime's prompt cache (0 when none did).
	PromptTokensDetails promptTokensDetails `json:"prompt_tokens_details"`
}

type promptTokensDetails struct {
	CachedTokens int `json:"cached_tokens"`
}

func usageOf(r *schemas.ResultMsg) usage {
	u := usage{PromptTokens: r.Usage.PromptTokens, CompletionTokens: r.Usage.CompletionTokens, TotalTokens: r.Usage.TotalTokens,
		PromptTokensDetails: promptTokensDetails{CachedTokens: r.Usage.CachedTokens}}
	if u.TotalTokens == 0 {
		u.TotalTokens = u.PromptTokens + u.CompletionTokens
	}
	return u
}

// finishReason maps the runtime's reason to OpenAI's: stop or length.
func finishReason(r *schemas.ResultMsg) string {
	if r.FinishReason == "length" {
		return "length"
	}
	return "stop"
}

// meta is what every body and chunk of one response repeats.
type meta struct {
	id           string
	created      int64
	model        string
	includeUsage bool
}

// format shapes one endpoint's bodies and stream events.
type format interface {
	idPrefix() string
	body(m meta, text, finish string, u usage, lp *logprobs) any
	first(m meta) any // nil when the endpoint has no opening event
	delta(m meta, text string, lp *logprobs) any
	final(m meta, finish string) any
	usage(m meta, u usage) any
}

// events is several stream events a format returns at once; a format may also
// return nil: nothing to send yet.
type events []any

// each lists the events v stands for.
func each(v any) []any {
	switch e := v.(type) {
	case nil:
		return nil
	case events:
		return e
	}
	return []any{v}
}

// sendEach sends the events v stands for.
func sendEach(sse *sseWriter, v any) error {
	for _, e := range each(v) {
		if err := sse.send(e); err != nil {
			return err
		}
	}
	return nil
}

// choiceFormat is the format one choice answers with: formats that keep state
// per choice (chat reading tool calls) give each its own.
func choiceFormat(f format) format {
	if c, ok := f.(interface{ choice() format }); ok {
		return c.choice()
	}
	return f
}

// runSpec is how a request's answer is delivered. It does not hold the job:
// each jobCall copies it and lives as long as the request, and a job holds the
// request's prompt, messages and schemas, which nothing after Submit reads.
type runSpec struct {
	endpoint     string
	params       paramMap
	stream       bool
	includeUsage bool
	logprobs     bool // the answer reports token logprobs
	n            int  // choices: n > 1 runs n jobs (choices.go)
	format       format
	slot         *heldSlot // the tenant's in-flight slot, kept while a refused cancel is tried again
	key          string    // the request's Idempotency-Key, "" for none (idempotency.go)
	fingerprint  string    // with a key, the job's jobFingerprint
}

// request is what an OpenAI endpoint's body decodes into: it maps itself to a
// job and says how the answer should be delivered.
type request[T any] interface {
	*T
	toJob(defaultModel string) (*schemas.JobRequest, paramMap, *apiError)
	stream() bool
	includeUsage() bool
	choices() int
}

// serve decodes a body of type T, maps it to a job and runs it; every generation
// endpoint is this with its own request type and response format.
func serve[T any, R request[T]](g *Gateway, w http.ResponseWriter, r *http.Request, endpoint string, fields fieldSet, f format) {
	// The tenant's in-flight slot is taken before its body is read: a tenant at
	// its limit is refused without the gateway holding its body.
	tenant := tenantOf(r)
	// First, before its slot or its body: each request holds a connection
	// the connection bound never closes (tenantConns).
	leave, ok := g.conns.enter(tenant)
	if !ok {
		g.refuse(w, endpoint, tenant, errTenantConnsFull(tenant, g.conns.shareNow(), g.cfg.RetryAfter))
		return
	}
	defer leave()
	defer countConn(r)() // and the connection bound keeps its connection (connlimit.go)
	// A retry with the key of a job held after its client left takes that
	// job's slot, not one more (keyedHolds). Which job it names is known
	// once its body is read, so while the tenant holds keyed jobs a keyed
	// request takes its slot after (the tenant's body budget bounds what it
	// reads meanwhile).
	var slot *heldSlot
	defer func() { slot.done() }()
	takeSlot := func() bool {
		releaseSlot, ok := g.limits.acquire(tenant)
		if !ok {
			g.refuse(w, endpoint, tenant, errTenantQueueFull(tenant, g.limits.limits.MaxInFlight, g.cfg.RetryAfter))
			return false
		}
		slot = newHeldSlot(releaseSlot)
		return true
	}
	if r.Header.Get(idempotencyHeader) == "" || !g.holds.holding(tenant) {
		if !takeSlot() {
			return
		}
	}
	body, releaseBody, aerr := g.readBody(w, r, tenant)
	if aerr != nil {
		g.fail(w, endpoint, aerr)
		return
	}
	if aerr := checkBodyValues(body); aerr != nil {
		releaseBody()
		g.fail(w, endpoint, aerr)
		return
	}
	req := R(new(T))
	aerr = decodeBody(body, req, fields)
	releaseBody() // the raw bytes are garbage now; what was decoded is the job's
	if aerr != nil {
		g.fail(w, endpoint, aerr)
		return
	}
	job, pm, aerr := req.toJob(g.cfg.DefaultModel)
	if aerr != nil {
		g.fail(w, endpoint, aerr)
		return
	}
	if rf, ok := any(req).(interface{ format(format) format }); ok {
		f = rf.format(f)
	}
	key, aerr := idempotencyKey(r)
	if aerr != nil {
		g.fail(w, endpoint, aerr)
		return
	}
	var fingerprint string
	if key != "" {
		fingerprint = jobFingerprint(job)
	}
	if slot == nil {
		if slot = g.holds.join(keyedJobID(tenant, key, fingerprint, 0)); slot == nil && !takeSlot() {
			return
		}
	}
	g.run(w, r, job, runSpec{endpoint: endpoint, params: pm, stream: req.stream(), includeUsage: req.includeUsage(),
		logprobs: job.Logprobs != nil, n: req.choices(), format: f, slot: slot, key: key, fingerprint: fingerprint})
}

// run submits the job and answers with its outcome, streamed or whole.
func (g *Gateway) run(w http.ResponseWriter, r *http.Request, job *schemas.JobRequest, spec runSpec) {
	if aerr := g.admit(r, job); aerr != nil {
		g.refuse(w, spec.endpoint, job.Tenant, aerr)
		return
	}
	now := time.Now().UTC()
	job.ID = jobID(job.Tenant, spec.key, spec.fingerprint, 0)
	job.Priority = schemas.PriorityNormal
	job.ReplyTo = bus.ReplySubject(job.Tenant, job.ID)
	job.CreatedAt = &now
	if g.timeout > 0 {
		dl := now.Add(g.timeout)
		job.Deadline = &dl
	}

	if aerr := checkJob(job, spec); aerr != nil {
		g.fail(w, spec.endpoint, aerr)
		return
	}
	// After the job's bounds hold: max_tokens unchecked, n × max_tokens ×
	// entries overflowed and passed the budget (this session's review).
	release, aerr := g.holdLogprobs(job, spec.n, spec.endpoint)
	if aerr != nil {
		g.refuse(w, spec.endpoint, job.Tenant, aerr)
		return
	}
	defer release()

	rctx, rcancel := g.registryContext(r)
	st, err := g.registry.status(rctx, job.Model)
	rcancel()
	if err != nil {
		if r.Context().Err() != nil {
			return
		}
		g.log.Warn().Err(err).Msg("reading the worker registry failed")
		g.fail(w, spec.endpoint, errUnavailable("The worker registry is unavailable."))
		return
	}
	switch st {
	case modelUnknown:
		g.fail(w, spec.endpoint, errModelNotFound(job.Model))
		return
	case modelAway:
		g.fail(w, spec.endpoint, errModelUnavailable(job.Model))
		return
	}

	ctx := r.Context()
	waitCtx, cancel := ctx, context.CancelFunc(func() {})
	if g.timeout > 0 {
		waitCtx, cancel = context.WithDeadline(ctx, job.Deadline.Add(g.grace))
	}
	defer cancel()

	if spec.n > 1 {
		g.runChoices(w, r, job, spec, now, waitCtx)
		return
	}
	stream, watched, err := g.submit(waitCtx, job, spec)
	if err != nil {
		g.cancelUnsure(ctx, job, err, "submit failed or its client left before it was acknowledged", spec.slot)
		if ctx.Err() != nil {
			return // the client left
		}
		if !errors.Is(err, bus.ErrQueueFull) {
			g.log.Warn().Err(err).Str("job_id", job.ID).Msg("submit failed")
		}
		g.fail(w, spec.endpoint, fromSubmit(err, spec.params, g.cfg.RetryAfter))
		return
	}
	defer stream.Close()
	job = submitted(job)
	// The job id lets a client fetch the durable result (mlx-serving result <id>)
	// or cancel, whatever happens to this connection.
	w.Header().Set("X-Mlx-Job-Id", job.ID)
	g.obs.JobSubmitted(spec.endpoint)
	log := g.log.With().Str("job_id", job.ID).Str("model", job.Model).Logger()
	log.Debug().Bool("stream", spec.stream).Msg("job submitted")

	m := meta{id: spec.format.idPrefix() + job.ID, created: now.Unix(), model: job.Model, includeUsage: spec.stream && spec.includeUsage}
	spec.format = choiceFormat(spec.format)
	j := &jobCall{g: g, w: w, r: r, spec: spec, job: job, stream: stream, waitCtx: waitCtx, meta: m, watched: watched}
	if spec.stream {
		j.streamed()
	} else {
		j.whole()
	}
}

// jobCall is one request's wait for its job.
type jobCall struct {
	g       *Gateway
	w       http.ResponseWriter
	r       *http.Request
	spec    runSpec
	job     *schemas.JobRequest // submitted(job): id, tenant and model only
	stream  *bus.JobStream
	waitCtx context.Context
	meta    meta
	// diverged: the job's text stopped being a continuation of what the client
	// was sent (Event.Drop); nothing more is sent.
	diverged bool
	// sent is the text the client was sent. held: events were lost on the way
	// (Event.Missed, e.g. a NATS reconnect), so a later delta would leave a
	// hole in the client's text; nothing more is sent until the terminal,
	// which sends the record's text past sent (closing). Red team round 21:
	// forwarding after a gap ended completed jobs stream_diverged, and with
	// n > 1 cancelled their healthy siblings. Kept here, not read from the
	// stream: its events are read on another goroutine while one is handled.
	sent []byte
	held bool
	// watched: the job is an earlier try's, named by the request's key
	// (idempotency.go): a failed end is answered as such (failure).
	watched bool
}

// next returns the stream's next event, counting what the stream repaired.
func (j *jobCall) next() (bus.Event, error) {
	ev, err := j.stream.Next(j.waitCtx)
	if err == nil {
		if ev.Missed > 0 {
			j.g.obs.EventsMissed(ev.Missed)
		}
		if ev.Recovered {
			j.g.obs.ResultRecovered()
		}
		if ev.Result != nil && ev.Result.Status == schemas.StatusCompleted {
			u := usageOf(ev.Result)
			j.g.obs.TokensCounted(u.PromptTokens, u.CompletionTokens)
		}
	}
	return ev, err
}

// whole answers with one body once the job ends.
func (j *jobCall) whole() {
	body, aerr, answer := j.await()
	switch {
	case !answer:
	case aerr != nil:
		j.g.fail(j.w, j.spec.endpoint, aerr)
	default:
		j.g.answer(j.w, body, j.job.ID)
	}
}

// await waits for the job's end and returns its one-choice body, or the error to
// answer with; answer is false when nobody is left to answer (the client left).
func (j *jobCall) await() (body any, aerr *apiError, answer bool) {
	for {
		ev, err := j.next()
		if err != nil {
			e := j.abandon(err)
			return nil, e, e != nil
		}
		res := ev.Result
		if res == nil {
			continue
		}
		if res.Status != schemas.StatusCompleted {
			return nil, j.failure(res), true
		}
		model := j.meta
		if res.Model != "" {
			model.model = res.Model
		}
		var lp *logprobs
		if j.spec.logprobs {
			lp = &logprobs{entries: finalLogprobs(ev, j.stream)}
		}
		return j.spec.format.body(model, res.Text, finishReason(res), usageOf(res), lp), nil, true
	}
}

// abandon handles a wait that ended without a terminal: the client left, the
// request timed out, or the bus failed. The job is cancelled in each case, since
// nobody will read its answer. It returns the error to answer with, or nil when
// there is nobody to answer.
func (j *jobCall) abandon(err error) *apiError {
	switch {
	case j.r.Context().Err() != nil:
		j.clientLeft(err)
		return nil
	case errors.Is(j.waitCtx.Err(), context.DeadlineExceeded):
		j.cancel("request timeout")
		return errTimeout()
	default:
		j.g.log.Warn().Err(err).Str("job_id", j.job.ID).Msg("job stream failed")
		j.cancel("gateway stream failed")
		if errors.Is(err, bus.ErrNotConnected) {
			return errUnavailable("The bus connection was lost.")
		}
		return errInternal("Waiting for the job failed.")
	}
}

// clientLeft cancels the job of a client that left or stopped reading
// (clientGone).
func (j *jobCall) clientLeft(err error) {
	j.cancel(j.g.clientGone(err, j.job.ID)) // a keyed job is held, not cancelled: cancelJob
}

func (j *jobCall) cancel(reason string) {
	until, _ := j.waitCtx.Deadline() // the job's deadline and grace, if it has one
	j.g.cancelJob(j.r.Context(), j.job.Tenant, j.job.ID, reason, until, j.spec.slot)
}
