package worker

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Why a running job is being stopped before the model finished.
const (
	stopCancelled = "cancelled" // a cancel request: terminal cancelled
	stopExpired   = "expired"   // the deadline passed: terminal expired
	stopShutdown  = "shutdown"  // the worker is stopping: attempt report, retried elsewhere
	stopRetry     = "retry"     // its dispatcher gave up on the attempt (attempt_timeout): attempt report with the text sent
)

// jobRun is one attempt of one job on this worker.
type jobRun struct {
	aj           schemas.AssignedJob
	key          string // subjects.JobRef{tenant, id}.Key(): the same id in two tenants is two jobs
	dispatcherID string // the dispatcher that placed it, to which its end is handed
	requestID    string
	accepted     time.Time

	slotFreed bool // guarded by jobTable.mu

	mu         sync.Mutex
	client     *RuntimeClient // set once the generate request is written
	stopReason string
	stopCh     chan struct{} // closed by the first stop request
}

func newJobRun(aj schemas.AssignedJob, dispatcherID string) *jobRun {
	return &jobRun{
		aj:           aj,
		key:          subjects.JobRef{Tenant: aj.Job.Tenant, ID: aj.Job.ID}.Key(),
		dispatcherID: dispatcherID,
		requestID:    runtimeRequestID(aj),
		accepted:     time.Now(),
		stopCh:       make(chan struct{}),
	}
}

// requestStop records why the job must stop and, when the generate is already in
// the runtime, asks the runtime to cancel it. The first reason wins.
func (r *jobRun) requestStop(reason string) {
	r.mu.Lock()
	if r.stopReason != "" {
		r.mu.Unlock()
		return
	}
	r.stopReason = reason
	close(r.stopCh)
	c := r.client
	r.mu.Unlock()
	if c != nil {
		go cancelInRuntime(c, r.requestID)
	}
}

// sent is the generate's Sent hook: a stop that came before the request reached
// the runtime is forwarded now, so it cannot overtake the generate.
func (r *jobRun) sent(c *RuntimeClient) {
	r.mu.Lock()
	r.client = c
	stopped := r.stopReason != ""
	r.mu.Unlock()
	if stopped {
		go cancelInRuntime(c, r.requestID)
	}
}

func (r *jobRun) reason() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stopReason
}

func cancelInRuntime(c *RuntimeClient, requestID string) {
	ctx, cancel := context.WithTimeout(context.Background(), defaultCallTimeout)
	defer cancel()
	_, _ = c.Cancel(ctx, requestID)
}

// defaultCallTimeout bounds small runtime calls made on a job's behalf.
const defaultCallTimeout = 10 * time.Second

// runtimeRequestID names one attempt of a job in the runtime:
// <tenant>:<job-id>.<attempt>. The runtime refuses a second generate with an
// id in flight, and job ids are unique only within a tenant: without the
// tenant, two tenants' jobs of one id on the same worker collided and the
// second failed duplicate_request (the red team's F2), which a tenant could
// provoke on purpose with a guessed id.
func runtimeRequestID(aj schemas.AssignedJob) string {
	return subjects.TenantToken(aj.Job.Tenant) + ":" + aj.Job.ID + "." + strconv.Itoa(aj.Attempt)
}

// generateParams maps a job (and the resume point of an earlier attempt) to the
// runtime's generate params.
func generateParams(r *jobRun) *schemas.GenerateParams {
	j := &r.aj.Job
	p := &schemas.GenerateParams{
		RequestID:         r.requestID,
		Model:             j.Model,
		Prompt:            j.Prompt,
		Messages:          j.Messages,
		MaxTokens:         j.MaxTokens,
		Sampling:          j.Sampling,
		JSONSchema:        j.JSONSchema,
		Tools:             j.Tools,
		ToolChoice:        j.ToolChoice,
		ParallelToolCalls: j.ParallelToolCalls,
		// A tenant's prompts and outputs are its own: the runtime reuses
		// prompt-cache entries only within a scope (the red team's F1).
		CacheScope: subjects.TenantToken(j.Tenant),
	}
	if res := r.aj.Resume; res != nil {
		p.Continuation = res.Text
		if p.MaxTokens == 0 {
			p.MaxTokens = schemas.DefaultMaxTokens
		}
		p.MaxTokens -= res.CompletionTokens
	}
	return p
}

// runJob runs one attempt and ends it with exactly one of: a terminal result
// (RESULTS first, then the reply subject) or an attempt report.
func (a *Agent) runJob(ctx context.Context, r *jobRun) {
	defer a.jobs.release(r)
	j := &r.aj.Job
	log := a.log.With().Str("job_id", j.ID).Int("attempt", r.aj.Attempt).Str("model", j.Model).Logger()
	ctx, span := a.startGenerate(ctx, r)
	defer span.End()

	var resumeText string
	var resumeTokens int
	if r.aj.Resume != nil {
		resumeText, resumeTokens = r.aj.Resume.Text, r.aj.Resume.CompletionTokens
	}
	resumed := resumeText != "" || resumeTokens > 0
	a.cfg.Observer.JobStarted(j.Model, r.aj.Attempt, resumed)
	log.Debug().Bool("resumed", resumed).Msg("job started")
	em := newEmitter(a.nc, j.ReplyTo, j.ID, r.aj.Attempt, resumeTokens, a.cfg.Coalesce).startingAt(len(resumeText)).
		alsoTo(subjects.Progress(a.cfg.WorkerID, r.dispatcherID, j.Tenant), a.mark)
	defer em.stop()

	if j.Deadline != nil {
		until := time.Until(*j.Deadline)
		if until <= 0 {
			r.requestStop(stopExpired)
		} else {
			t := time.AfterFunc(until, func() { r.requestStop(stopExpired) })
			defer t.Stop()
		}
	}

	var (
		gen     *schemas.GenerateResult
		genErr  error
		started time.Time
	)
	p := generateParams(r)
	switch {
	case r.reason() != "":
		// Stopped before it started: nothing to run.
	case r.aj.Resume != nil && p.MaxTokens <= 0:
		// An earlier attempt already produced every token the job may have. (A
		// job that names no max_tokens and did not run before gets the runtime's
		// default: 0 here means "omitted", not "none left".)
		gen = &schemas.GenerateResult{RequestID: r.requestID, FinishReason: schemas.FinishLength}
	default:
		c := a.sup.client()
		if c == nil {
			genErr = ErrRuntimeUnavailable
			break
		}
		started = time.Now()
		gen, genErr = a.generateWhenFree(ctx, r, c, p, jobHooks(r, c, em))
		if resumed && contextExceeded(genErr) {
			// The prompt and the text the caller already has no longer fit the
			// model's context (text retokenizes longer than the tokens that
			// made it): the generation has reached the context, the end a
			// first attempt would have met there too. The job completes with
			// what was sent, finish_reason length; failing it context_exceeded
			// read as the client's fault, after a retry it did not ask for.
			gen, genErr = &schemas.GenerateResult{RequestID: r.requestID, FinishReason: schemas.FinishLength}, nil
		}
	}
	em.flush()
	traceTimings(span, started, gen)

	reason := r.reason()
	base := schemas.ResultMsg{
		Type: "result", JobID: j.ID, Attempt: r.aj.Attempt, Seq: em.seq,
		Model: j.Model, Tenant: j.Tenant, WorkerID: a.cfg.WorkerID,
	}
	completion := resumeTokens + em.tokens

	switch {
	case gen != nil && gen.FinishReason != schemas.FinishCancelled:
		res := base
		res.Status = schemas.StatusCompleted
		res.FinishReason = gen.FinishReason
		res.Text = resumeText + gen.Text
		res.Usage = usage(gen, resumeTokens)
		res.Timings = timings(r, gen)
		if j.Logprobs != nil {
			res.Logprobs, res.LogprobsTruncated = boundLogprobs(gen.Logprobs)
			res.LogprobsTruncated = res.LogprobsTruncated || gen.LogprobsTruncated || resumeTokens > 0
		}
		a.prefixRan(r, res.Text) // its runtime caches the prompt and the reply now: a routing hint (prefixes.go)
		res.FinishedAt = a.jobs.freeSlot(r)
		traceEnd(span, res.Status, nil)
		a.finish(ctx, &res, r.dispatcherID, r.aj.Placement)
	case reason == stopCancelled || reason == stopExpired:
		res := base
		res.FinishReason = schemas.FinishCancelled
		res.Text = resumeText + em.text.String()
		res.Usage = schemas.Usage{CompletionTokens: completion, TotalTokens: completion}
		if gen != nil {
			res.Text = resumeText + gen.Text
			res.Usage = usage(gen, resumeTokens)
			res.Timings = timings(r, gen)
		}
		if reason == stopCancelled {
			res.Status = schemas.StatusCancelled
			res.Error = &schemas.ErrorInfo{Code: schemas.CodeCancelled, Message: "cancelled on request"}
		} else {
			res.Status = schemas.StatusExpired
			res.Error = &schemas.ErrorInfo{Code: schemas.CodeDeadlineExceeded, Message: "the job's deadline passed"}
		}
		res.FinishedAt = a.jobs.freeSlot(r)
		traceEnd(span, res.Status, res.Error)
		a.finish(ctx, &res, r.dispatcherID, r.aj.Placement)
	default:
		// Everything else either failed for good (a runtime error about this job)
		// or may succeed elsewhere (the runtime or the worker went away).
		var rerr *RuntimeError
		code, msg, retryable := schemas.CodeRuntimeCrashed, "runtime exited while the job ran", true
		switch {
		case reason == stopRetry:
			// The report carries exactly what the caller was sent (flushed
			// above): the retry resumes there, not from the dispatcher's
			// copy, which may lag behind the events still on their way.
			code, msg = schemas.CodeAttemptTimeout, "its dispatcher gave up on the attempt (attempt_timeout)"
		case gen != nil || reason == stopShutdown || ctx.Err() != nil:
			code, msg = schemas.CodeWorkerShutdown, "the worker stopped before the job finished"
		case errors.Is(genErr, ErrRuntimeUnavailable):
			code, msg = schemas.CodeRuntimeDown, "the runtime is not running"
		case errors.As(genErr, &rerr):
			code, msg = rerr.Code(), rerr.Err.Message
			retryable = schemas.Retryable(code) // out_of_memory, shutting_down: codes/errors.json
		}
		if !retryable {
			res := base
			res.Status = schemas.StatusFailed
			res.Text = resumeText
			res.Usage = schemas.Usage{CompletionTokens: completion, TotalTokens: completion}
			res.Error = &schemas.ErrorInfo{Code: code, Message: msg}
			res.FinishedAt = a.jobs.freeSlot(r)
			traceEnd(span, res.Status, res.Error)
			a.finish(ctx, &res, r.dispatcherID, r.aj.Placement)
			break
		}
		log.Warn().Err(genErr).Str("code", code).Msg("attempt ended without a result; reporting it for retry")
		traceEnd(span, "retrying", &schemas.ErrorInfo{Code: code, Message: msg})
		a.reportAttempt(j.Model, &schemas.AttemptReportMsg{
			JobID: j.ID, Tenant: subjects.RecordTenant(j.Tenant), Attempt: r.aj.Attempt, WorkerID: a.cfg.WorkerID,
			Error:            schemas.ErrorInfo{Code: code, Message: msg, Retryable: true},
			Text:             resumeText + em.text.String(),
			Seq:              em.seq,
			CompletionTokens: completion,
			ReportedAt:       a.jobs.freeSlot(r),
		})
	}
}

// contextExceeded reports whether the runtime refused a generate because its
// prompt does not fit the model's context.
func contextExceeded(err error) bool {
	var rerr *RuntimeError
	return errors.As(err, &rerr) && rerr.Code() == schemas.CodeContextExceeded
}

// jobHooks wires a generate to the job's emitter and stop handling.
func jobHooks(r *jobRun, c *RuntimeClient, em *emitter) GenerateHooks {
	return GenerateHooks{
		Sent:  func() { r.sent(c) },
		Chunk: em.chunk,
	}
}

func usage(gen *schemas.GenerateResult, resumeTokens int) schemas.Usage {
	u := gen.Usage
	u.CompletionTokens += resumeTokens
	u.TotalTokens = u.PromptTokens + u.CompletionTokens
	return u
}

func timings(r *jobRun, gen *schemas.GenerateResult) *schemas.Timings {
	t := &schemas.Timings{TTFTMs: gen.Timings.TTFTMs, TotalMs: gen.Timings.TotalMs, TokensPerSec: gen.Timings.TokensPerSec}
	if c := r.aj.Job.CreatedAt; c != nil && r.accepted.After(*c) {
		t.QueuedMs = float64(r.accepted.Sub(*c).Microseconds()) / 1000
	}
	return t
}

// finish hands the job's terminal record to the dispatcher that placed it
// (subjects.Done), which writes it to RESULTS, sends it as the last event on
// the reply subject and acks the job — in that order, so nothing is acked that
// is not stored. Workers never write RESULTS: a worker credential cannot end a
// job it does not run. A record too large for the bus is replaced by one that
// fits first (fitRecord). The hand-over is retried across short bus hiccups;
// when it fails for good the attempt is reported (handOverFailedReport), so a
// dispatcher that still holds the job retries it at once; one that is gone
// ignores the report, and the job's JOBS message is redelivered after its ack
// wait and runs again elsewhere, which is the at-least-once half of "exactly
// one terminal".
//
// A dispatcher that is gone (no responder) or does not answer cannot take the
// record (handOverUnanswered): a completed one is then offered to any dispatcher with the assignment's
// placement token (adopt), so the job is not run again.
func (a *Agent) finish(ctx context.Context, res *schemas.ResultMsg, dispatcherID, placement string) {
	if res.FinishedAt.IsZero() {
		res.FinishedAt = time.Now().UTC()
	}
	log := a.log.With().Str("job_id", res.JobID).Str("tenant", res.Tenant).Int("attempt", res.Attempt).Str("model", res.Model).Str("status", res.Status).Logger()
	// A record too large for the bus ends the job as failed result_too_large
	// with what fits (fit.go); sent whole, it was never stored.
	orig := res
	res, data, cut, err := fitRecord(res, recordBudget(a.maxPayload()))
	if err == nil {
		err = schemas.Validate(schemas.Result, data)
	}
	if cut && err == nil {
		log.Warn().Int("text_bytes", len(orig.Text)).Int("kept_bytes", len(res.Text)).Int("max_payload", a.maxPayload()).
			Msg("terminal record does not fit the bus; ending the job failed result_too_large with the text cut")
	}
	if err != nil {
		res = orig
		// The dispatcher would refuse the record, and dropping it left the job
		// running there for ever: the attempt is reported failed instead
		// (invalidRecordReport says how and why not retryable).
		rep, ok := invalidRecordReport(res, a.cfg.WorkerID, err)
		if !ok {
			log.Error().Err(err).Msg("terminal record is invalid, and so is the attempt report that would replace it; nothing sent")
			return
		}
		log.Error().Err(err).Msg("terminal record is invalid; attempt reported failed instead")
		a.reportAttempt(res.Model, rep)
		return
	}
	subject := subjects.Done(a.cfg.WorkerID, dispatcherID)
	adoptable := placement != "" && res.Status == schemas.StatusCompleted
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 100 * time.Millisecond
	bo.MaxElapsedTime = a.cfg.ResultTimeout
	if adoptable {
		// Offered for adoption after one unanswered try, not after
		// ResultTimeout: the job's ack wait ran from before it finished, so
		// an adoption ResultTimeout (30 s) later came after the redelivery,
		// and with max_attempts 2 the completed job ran again (red team
		// round 18, operator F2: 4 of 4). Early adoption is safe: first
		// writer wins.
		bo.MaxElapsedTime = min(a.cfg.ResultTimeout, adoptAfter)
	}
	noResponders := 0
	var status string
	err = backoff.Retry(func() error {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), min(5*time.Second, a.cfg.ResultTimeout))
		defer cancel()
		m, err := a.handOver(rctx, subject, data)
		if errors.Is(err, nats.ErrNoResponders) {
			// The dispatcher may be reconnecting; a few tries, then it is gone.
			if noResponders++; noResponders >= 5 {
				return backoff.Permanent(err)
			}
			return err
		}
		if err != nil {
			return err
		}
		status, err = readFinishReply(m, "finish")
		return err
	}, bo)
	if handOverUnanswered(err) && adoptable {
		if st, aerr := a.adopt(ctx, subject, data, placement); aerr == nil {
			status, err = st, nil
			log.Warn().Str("dispatcher_id", dispatcherID).Str("answer", st).Msg("the dispatcher that placed the job did not answer; its record was offered for adoption")
		} else {
			log.Error().Err(aerr).Msg("the dispatcher that placed the job did not answer, and no dispatcher took its record")
		}
	}
	switch {
	case err != nil:
		// Reported, the attempt is retried at once by the dispatcher, if it
		// still holds the job (it ignores the report otherwise: ended, or a
		// dispatcher that is gone, whose job is redelivered after its ack
		// wait). Unreported, it stayed running there until attempt_timeout.
		log.Error().Err(err).Str("dispatcher_id", dispatcherID).Msg("could not hand the result to its dispatcher; reporting the attempt for retry")
		a.reportAttempt(res.Model, handOverFailedReport(res, a.cfg.WorkerID, dispatcherID, err))
		return
	case status == schemas.FinishExists:
		log.Info().Msg("job already has a terminal result; this one was not recorded")
		return
	case status != schemas.FinishStored:
		log.Warn().Str("answer", status).Msg("dispatcher no longer holds this attempt; result not recorded")
		return
	}
	a.cfg.Observer.JobFinished(res.Model, res.Status)
	log.Debug().Msg("job finished")
}

// handOverUnanswered reports whether the hand-over ended with no answer from
// the dispatcher that placed the job: none subscribed (gone), or none that
// answered within ResultTimeout (hung, SIGSTOPped, or a connection the server
// has not yet noticed is dead: minutes, until its ping timeout). Either way
// the record is offered for adoption: only no-responders counted before, and
// a hung dispatcher's completed job ran again after its ack wait (with
// max_attempts 1, ended attempts_exhausted). Adopting while that dispatcher
// is alive is safe: the record is stored first writer wins, and the
// dispatcher learns it from RESULTS (results.go, onResult) and acks the job.
func handOverUnanswered(err error) bool {
	return errors.Is(err, nats.ErrNoResponders) || errors.Is(err, nats.ErrTimeout) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, errBusy)
}

// errBusy: the dispatcher answered busy, not having read the record (too many
// of this worker's requests waiting there: dispatcher/takequeue.go); tried
// again like no answer.
var errBusy = errors.New("worker: the dispatcher was busy with this worker's requests and did not read the record")

// handOverRequest is the default Agent.handOver: a request on the bus.
func (a *Agent) handOverRequest(ctx context.Context, subject string, data []byte) ([]byte, error) {
	m, err := a.nc.RequestWithContext(ctx, subject, data)
	if err != nil {
		return nil, err
	}
	return m.Data, nil
}

// reportAttempt tells dispatchers an attempt of a job of model ended without a
// terminal.
func (a *Agent) reportAttempt(model string, m *schemas.AttemptReportMsg) {
	a.cfg.Observer.AttemptReported(m.Error.Code)
	var err error
	textBytes := len(m.Text)
	b, ok := boundReport(m, a.maxPayload()) // a report over the max payload or its schema is never heard
	switch {
	case !ok:
		err = errors.New("worker: the attempt report fails its schema even without text")
	case len(m.Text) < textBytes:
		a.log.Warn().Str("job_id", m.JobID).Int("attempt", m.Attempt).Int("text_bytes", textBytes).
			Msg("attempt report too large for the bus or its schema; sent without text, the retry starts over")
	}
	if err == nil {
		err = a.nc.PublishRequest(subjects.Attempt(a.cfg.WorkerID), a.mark, b) // subjects.Sent
	}
	if err != nil {
		a.log.Error().Err(err).Str("job_id", m.JobID).Int("attempt", m.Attempt).Str("model", model).Msg("could not publish the attempt report")
	}
}
