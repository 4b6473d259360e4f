package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// apply moves j through the transition table; the only place a job's state
// changes. Callers hold d.mu.
func (d *Dispatcher) apply(j *job, e Event) error {
	from := j.state
	to, err := Transition(from, e)
	if err != nil {
		d.metrics.IllegalTransitions.Add(1)
		d.jobLog(d.log.Error(), j).Err(err).Msg("illegal transition")
		return err
	}
	d.metrics.Transitions[from][e].Add(1)
	onW := func(s State) bool { return s == StateDispatched || s == StateRunning }
	if onW(from) && !onW(to) {
		d.onWorker--
	} else if !onW(from) && onW(to) {
		d.onWorker++
	}
	if from == StateRunning {
		d.slotFreed(j)
	} else if to == StateRunning {
		if w := d.workers[j.workerID]; w != nil {
			w.mine++
		}
	}
	j.state = to
	switch to {
	case StateCompleted:
		d.metrics.Completed.Add(1)
	case StateFailed:
		d.metrics.Failed.Add(1)
	case StateCancelled:
		d.metrics.Cancelled.Add(1)
	case StateExpired:
		d.metrics.Expired.Add(1)
	case StateDeadLettered:
		d.metrics.DeadLettered.Add(1)
	}
	return nil
}

// forget drops j from every index. Callers hold d.mu.
func (d *Dispatcher) forget(j *job) {
	if j.gone {
		return
	}
	j.gone = true
	d.endDispatch(j, j.lastErr.Code) // a job that ends before a worker took it
	if d.jobs[j.id] == j {
		delete(d.jobs, j.id)
	}
	if j.inQueue {
		d.unqueue(j)
	}
	if d.retrying[j.id] == j {
		delete(d.retrying, j.id)
	}
	if (j.state == StateDispatched || j.state == StateRunning) && !j.state.Terminal() {
		d.onWorker--
	}
	if j.replySub != nil {
		_ = j.replySub.Unsubscribe()
		j.replySub = nil
	}
	poke(d.changed)
	poke(d.wakePull)
}

// finishObserved ends j because a terminal record exists (seen on mlx.results.>
// or found in RESULTS at delivery). Callers hold d.mu.
func (d *Dispatcher) finishObserved(j *job, status string) {
	e, ok := eventForStatus(status)
	if !ok {
		d.jobLog(d.log.Error(), j).Str("status", status).Msg("result with unknown status")
		e = EvFailed
	}
	if err := d.apply(j, e); err != nil {
		return
	}
	d.forget(j)
	_ = j.msg.Ack()
}

// finishByDispatcher ends j with a terminal record this dispatcher writes:
// RESULTS first (first writer wins), then the reply subject, then the ack.
// Callers hold d.mu; the I/O runs outside it.
func (d *Dispatcher) finishByDispatcher(j *job, e Event, status string, errInfo *schemas.ErrorInfo) {
	if err := d.apply(j, e); err != nil {
		return
	}
	d.forget(j)
	// Attempt 0 says the job never ran (the schema's convention).
	attempt := 0
	if j.ran {
		attempt = j.attempt
	} else if e == EvExhausted {
		attempt = j.attempt - 1
	}
	res := &schemas.ResultMsg{
		Type: "result", JobID: j.id, Attempt: attempt, Seq: j.nextSeq, Status: status,
		Text: j.resume.Text, Usage: schemas.Usage{CompletionTokens: j.resume.CompletionTokens, TotalTokens: j.resume.CompletionTokens},
		Error: errInfo, Model: j.req.Model, Tenant: bus.RecordTenant(j.req.Tenant), WorkerID: j.workerID, FinishedAt: time.Now().UTC(),
	}
	if status == schemas.StatusCancelled {
		res.FinishReason = "cancelled"
	}
	var dlq *schemas.DLQRecordMsg
	switch e {
	case EvExhausted:
		dlq = &schemas.DLQRecordMsg{Job: j.req, Reason: "attempts_exhausted", Attempts: j.attempt, LastError: j.lastErr, DeadAt: res.FinishedAt, DispatcherID: d.cfg.DispatcherID}
	case EvDeadLetter:
		dlq = &schemas.DLQRecordMsg{Job: j.req, Reason: errInfo.Code, Attempts: attempt, LastError: *errInfo, DeadAt: res.FinishedAt, DispatcherID: d.cfg.DispatcherID}
	}
	if dlq != nil {
		if dlq.Job.ID == "" {
			dlq.Job.ID = j.id
		}
	}
	msg, replyTo := j.msg, j.req.ReplyTo
	d.io.Add(1)
	go func() {
		defer d.io.Done()
		d.writeTerminal(d.wctx, msg, replyTo, res, dlq)
	}()
}

func (d *Dispatcher) writeTerminal(ctx context.Context, msg jetstream.Msg, replyTo string, res *schemas.ResultMsg, dlq *schemas.DLQRecordMsg) {
	log := d.log.With().Str("job_id", res.JobID).Int("attempt", res.Attempt).Str("worker_id", res.WorkerID).Str("model", res.Model).Str("status", res.Status).Logger()
	if dlq != nil {
		data, err := json.Marshal(dlq)
		if err == nil {
			// The msg id names this record (job, attempt, time), so a retried
			// publish is deduplicated but a replayed job's new dead letter is not.
			_, err = d.js.Publish(ctx, bus.DLQSubject(res.JobID), data, jetstream.WithMsgID(bus.ResultMsgID(res)+".dlq"))
		}
		if err != nil {
			// Not acked: the redelivery dead-letters it again.
			log.Error().Err(err).Msg("dlq publish failed")
			_ = msg.Nak()
			return
		}
	}
	err := recordResult(ctx, d.js, res)
	switch {
	case errors.Is(err, errResultExists):
		// Someone else finished the job first; the caller already has that terminal.
		log.Debug().Msg("result already recorded")
	case err != nil:
		// Every terminal a dispatcher writes is derived again on redelivery.
		log.Error().Err(err).Msg("record result failed")
		_ = msg.Nak()
		return
	case replyTo != "":
		if data, err := json.Marshal(res); err == nil {
			_ = d.nc.Publish(replyTo, data)
		}
	}
	_ = msg.Ack()
}

// retryableFailure ends the current attempt of j; it is retried after a backoff
// or dead-lettered. resume is what the caller has received so far, if known
// better than from the reply subject (an attempt report). Callers hold d.mu.
func (d *Dispatcher) retryableFailure(j *job, info schemas.ErrorInfo, resume *schemas.Resume, nextSeq int) {
	if err := d.apply(j, EvAttemptFailed); err != nil {
		return
	}
	if resume != nil {
		j.resume = *resume
		j.nextSeq = nextSeq
	} else {
		j.resume.Text += j.cur.String()
		if j.curToks > 0 {
			j.resume.CompletionTokens = j.curToks
		}
	}
	j.cur.Reset()
	j.curToks = 0
	j.lastErr = info
	d.jobLog(d.log.Warn(), j).Str("code", info.Code).Msg("attempt failed")
	switch {
	case j.cancelReq:
		d.finishByDispatcher(j, EvCancel, schemas.StatusCancelled, &schemas.ErrorInfo{Code: "cancelled", Message: "cancelled while retrying"})
	case j.attempt-j.base >= d.cfg.MaxAttempts:
		d.finishByDispatcher(j, EvExhausted, schemas.StatusFailed, exhaustedError(j.attempt, info))
	case d.draining:
		// Nobody here will run it again; the next delivery goes elsewhere.
		d.forget(j)
		_ = j.msg.Nak()
	default:
		if j.bo == nil {
			b := backoff.NewExponentialBackOff()
			b.InitialInterval = d.cfg.BackoffInitial
			b.MaxInterval = d.cfg.BackoffMax
			b.Multiplier = d.cfg.BackoffMultiplier
			b.RandomizationFactor = 0.5
			b.MaxElapsedTime = 0
			b.Reset()
			j.bo = b
		}
		j.retryAt = time.Now().Add(j.bo.NextBackOff())
		d.retrying[j.id] = j
		d.metrics.Retries.Add(1)
		poke(d.wakeSched)
	}
}

func exhaustedError(attempts int, last schemas.ErrorInfo) *schemas.ErrorInfo {
	return &schemas.ErrorInfo{Code: "attempts_exhausted", Message: fmt.Sprintf("gave up after %d attempts; last error %s: %s", attempts, last.Code, last.Message)}
}

// onResult learns terminal states from RESULTS records as they are written.
func (d *Dispatcher) onResult(m *nats.Msg) {
	var r struct {
		JobID      string    `json:"job_id"`
		Status     string    `json:"status"`
		Attempt    int       `json:"attempt"`
		WorkerID   string    `json:"worker_id"`
		FinishedAt time.Time `json:"finished_at"`
	}
	if err := json.Unmarshal(m.Data, &r); err != nil || r.JobID == "" {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if j := d.jobs[r.JobID]; j != nil && !j.intaking {
		if r.WorkerID == j.workerID && r.Attempt == j.attempt {
			j.endedAt = r.FinishedAt
		}
		d.finishObserved(j, r.Status)
	} else if j != nil {
		// The delivery check will find the record; make sure it does not run.
		j.cancelReq = j.cancelReq || r.Status == schemas.StatusCancelled
	}
	poke(d.wakeSched)
}

// onCancel handles mlx.cancel.<id>: a held job not on a worker ends at once; a
// running one is cancelled by its worker (we only remember it, so it is not
// retried); a job still in JOBS is deleted there and finished cancelled.
func (d *Dispatcher) onCancel(m *nats.Msg) {
	id := strings.TrimPrefix(m.Subject, "mlx.cancel.")
	if id == "" || id == m.Subject {
		return
	}
	d.mu.Lock()
	j := d.jobs[id]
	if j != nil {
		j.cancelReq = true
		if (j.state == StateQueued && !j.intaking) || j.state == StateRetrying {
			d.finishByDispatcher(j, EvCancel, schemas.StatusCancelled, &schemas.ErrorInfo{Code: "cancelled", Message: cancelReason(m.Data)})
		}
		d.mu.Unlock()
		return
	}
	if d.draining {
		d.mu.Unlock()
		return
	}
	d.io.Add(1)
	d.mu.Unlock()
	go func() {
		defer d.io.Done()
		d.cancelInStream(d.wctx, id, cancelReason(m.Data))
	}()
}

func cancelReason(data []byte) string {
	var c schemas.CancelMsg
	if json.Unmarshal(data, &c) == nil && c.Reason != "" {
		return c.Reason
	}
	return "cancelled by request"
}

// cancelInStream finds a job still waiting in JOBS, deletes it and writes its
// terminal. Several dispatchers may race here: only the one whose delete
// succeeds writes, and RESULTS' first-writer-wins settles a race with a
// dispatcher that pulled the job meanwhile (it checks CANCELS before running).
func (d *Dispatcher) cancelInStream(ctx context.Context, id, reason string) {
	for _, p := range schemas.Priorities {
		raw, err := lastMsg(ctx, d.jobsStream, bus.JobSubject(p, id))
		if err != nil || raw == nil {
			continue
		}
		if err := d.jobsStream.DeleteMsg(ctx, raw.Sequence); err != nil {
			return
		}
		var req schemas.JobRequest
		_ = json.Unmarshal(raw.Data, &req)
		res := &schemas.ResultMsg{Type: "result", JobID: id, Attempt: 0, Status: schemas.StatusCancelled, FinishReason: "cancelled",
			Error: &schemas.ErrorInfo{Code: "cancelled", Message: reason}, Model: req.Model, Tenant: bus.RecordTenant(req.Tenant), FinishedAt: time.Now().UTC()}
		err = recordResult(ctx, d.js, res)
		if err == nil && req.ReplyTo != "" {
			if data, err := json.Marshal(res); err == nil {
				_ = d.nc.Publish(req.ReplyTo, data)
			}
		}
		if err == nil {
			d.metrics.Cancelled.Add(1)
		} else if !errors.Is(err, errResultExists) {
			d.log.Error().Err(err).Str("job_id", id).Int("attempt", 0).Str("model", req.Model).Msg("record cancelled result failed")
		}
		return
	}
}

// onAttemptReport: a worker says the attempt failed but may be retried.
func (d *Dispatcher) onAttemptReport(m *nats.Msg) {
	var r schemas.AttemptReportMsg
	if err := json.Unmarshal(m.Data, &r); err != nil {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	j := d.jobs[r.JobID]
	if j == nil || r.Attempt != j.attempt || (j.state != StateRunning && j.state != StateDispatched) {
		return
	}
	if w := d.workers[j.workerID]; w != nil {
		w.br.record(false, time.Now())
	}
	if r.WorkerID == j.workerID {
		j.endedAt = r.ReportedAt
	}
	d.retryableFailure(j, r.Error, &schemas.Resume{Text: r.Text, CompletionTokens: r.CompletionTokens}, r.Seq)
}

// onReply accumulates what the caller receives during the current attempt, so a
// retry after a silent death resumes exactly there.
func (d *Dispatcher) onReply(m *nats.Msg) {
	var ev schemas.TokenEventMsg
	if err := json.Unmarshal(m.Data, &ev); err != nil || ev.Type != "token" {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	j := d.jobs[ev.JobID]
	if j == nil || ev.Attempt != j.attempt || (j.state != StateRunning && j.state != StateDispatched) {
		return
	}
	if ev.Seq != j.nextSeq {
		d.jobLog(d.log.Warn(), j).Int("seq", ev.Seq).Int("want", j.nextSeq).Msg("token gap on reply subject")
	}
	j.cur.WriteString(ev.Delta)
	j.curToks = ev.Tokens
	j.nextSeq = ev.Seq + 1
}

// jobLog puts the standard job fields on a log event. Callers hold d.mu.
func (d *Dispatcher) jobLog(ev *zerolog.Event, j *job) *zerolog.Event {
	return ev.Str("job_id", j.id).Int("attempt", j.attempt).Str("worker_id", j.workerID).Str("model", j.req.Model)
}
