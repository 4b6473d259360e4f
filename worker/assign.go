package worker

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// rawAssignment keeps each job's bytes, so every job is validated against the job
// schema on its own: one bad job fails alone instead of sinking the batch.
type rawAssignment struct {
	BatchID         string     `json:"batch_id"`
	DispatcherID    string     `json:"dispatcher_id"`
	Model           string     `json:"model"`
	WorkerStartedAt *time.Time `json:"worker_started_at,omitempty"`
	Jobs            []struct {
		Job         json.RawMessage `json:"job"`
		Attempt     int             `json:"attempt"`
		Resume      *schemas.Resume `json:"resume,omitempty"`
		Traceparent string          `json:"traceparent,omitempty"`
		Placement   string          `json:"placement,omitempty"`
	} `json:"jobs"`
}

// invalidJob is a job that failed its schema: it gets a failed terminal.
type invalidJob struct {
	id, model    string
	tenant       string
	dispatcherID string
	attempt      int
	err          error
}

// handleAssign answers mlx.worker.<id>.assign. The whole batch is taken or none:
// rejected when the worker is not ready (draining, starting, runtime down) or the
// model is not loaded, full when free slots < jobs in the batch, else accepted and
// every valid job starts at once.
func (a *Agent) handleAssign(msg *nats.Msg) {
	var in rawAssignment
	if err := json.Unmarshal(msg.Data, &in); err != nil {
		a.replyAssign(msg, &schemas.AssignmentReplyMsg{
			Status: schemas.AssignRejected,
			Error:  &schemas.ErrorInfo{Code: schemas.CodeInvalidMessage, Message: "assignment is not valid JSON: " + err.Error()},
		}, 0)
		return
	}
	if in.WorkerStartedAt != nil && !in.WorkerStartedAt.Equal(a.startedAt) {
		// For another process of this worker id: not answered at all. Two
		// processes under one id both receive every assignment; answered,
		// a refusal here could be the reply the dispatcher takes while the
		// other process runs the batch. A process paused past the TTL and
		// resumed beside its replacement ran every job a second time (red
		// team round 17, F1: 12 of 12 streams mixed two texts).
		a.notForMe.Add(1)
		a.log.Warn().Str("batch_id", in.BatchID).Time("for_started_at", *in.WorkerStartedAt).Time("started_at", a.startedAt).
			Msg("assignment for another process of this worker id; not answered")
		return
	}
	out := &schemas.AssignmentReplyMsg{BatchID: in.BatchID}

	var runs []*jobRun
	var invalid []invalidJob
	for _, rj := range in.Jobs {
		var j schemas.JobRequest
		err := schemas.Validate(schemas.Job, rj.Job)
		if err == nil {
			err = json.Unmarshal(rj.Job, &j)
		}
		if err != nil {
			var loose struct {
				ID      string `json:"id"`
				ReplyTo string `json:"reply_to"`
				Model   string `json:"model"`
				Tenant  string `json:"tenant"`
			}
			_ = json.Unmarshal(rj.Job, &loose)
			invalid = append(invalid, invalidJob{id: loose.ID, model: loose.Model, tenant: loose.Tenant, attempt: rj.Attempt, dispatcherID: in.DispatcherID, err: err})
			continue
		}
		runs = append(runs, newJobRun(schemas.AssignedJob{Job: j, Attempt: rj.Attempt, Resume: rj.Resume, Traceparent: rj.Traceparent, Placement: rj.Placement}, in.DispatcherID))
	}

	a.assignMu.Lock()
	st := a.life.get()
	switch {
	case st == StateDraining || st == StateStopped:
		out.Status = schemas.AssignRejected
		out.Error = &schemas.ErrorInfo{Code: schemas.CodeWorkerDraining, Message: "worker is draining", Retryable: true}
	case st != StateReady && st != StateBusy:
		out.Status = schemas.AssignRejected
		out.Error = &schemas.ErrorInfo{Code: schemas.CodeRuntimeDown, Message: "runtime is not available (" + string(st) + ")", Retryable: true}
	case !a.modelsLoaded(in.Model, runs):
		out.Status = schemas.AssignRejected
		out.Error = &schemas.ErrorInfo{Code: schemas.CodeModelNotLoaded, Message: "model " + in.Model + " is not loaded on this worker"}
	}
	if out.Status != "" {
		a.assignMu.Unlock()
		out.FreeSlots = a.jobs.free()
		a.replyAssign(msg, out, len(in.Jobs))
		return
	}
	// A job already running here is a redelivered assignment of the same attempt:
	// it is accepted again without a second run. An older attempt still here
	// (still generating for a dispatcher that gave up on it, or still trying
	// to hand its record to a dispatcher that died) is superseded: it is
	// stopped, its end is ignored by the dispatcher (attempt mismatch), and the
	// new attempt runs. Taking the newer one for a duplicate would leave the job
	// with no run at all, unacked until this worker goes away.
	fresh := runs[:0]
	var superseded []*jobRun
	for _, r := range runs {
		old := a.jobs.get(r.key)
		switch {
		case old == nil:
			fresh = append(fresh, r)
		case old.aj.Attempt < r.aj.Attempt:
			superseded = append(superseded, old)
			fresh = append(fresh, r)
		}
	}
	runs = fresh
	ok, free := a.jobs.reserve(runs, len(runs)+len(invalid))
	a.assignMu.Unlock()
	out.FreeSlots = free
	if !ok {
		out.Status = schemas.AssignFull
		a.replyAssign(msg, out, len(in.Jobs))
		return
	}
	out.Status = schemas.AssignAccepted
	a.replyAssign(msg, out, len(in.Jobs))
	for _, old := range superseded {
		old.requestStop(stopShutdown)
	}

	for _, r := range runs {
		go a.runJob(a.jobCtx, r)
	}
	for _, bad := range invalid {
		a.cfg.Observer.SchemaRejected()
		go a.failInvalid(bad)
	}
}

func (a *Agent) modelsLoaded(model string, runs []*jobRun) bool {
	if model != "" && !a.sup.hasModel(model) {
		return false
	}
	for _, r := range runs {
		if !a.sup.hasModel(r.aj.Job.Model) {
			return false
		}
	}
	return true
}

// replyAssign answers an assignment that carried jobs jobs.
func (a *Agent) replyAssign(msg *nats.Msg, out *schemas.AssignmentReplyMsg, jobs int) {
	out.WorkerID = a.cfg.WorkerID
	a.cfg.Observer.Assignment(out.Status, jobs)
	b, err := json.Marshal(out)
	if err == nil {
		err = msg.Respond(b)
	}
	if err != nil && !errors.Is(err, nats.ErrMsgNoReply) {
		a.log.Warn().Err(err).Str("batch_id", out.BatchID).Msg("could not answer the assignment")
	}
	a.log.Debug().Str("batch_id", out.BatchID).Str("status", out.Status).Int("free_slots", out.FreeSlots).Msg("assignment answered")
}

// failInvalid ends a job that failed its schema with a failed terminal.
func (a *Agent) failInvalid(bad invalidJob) {
	if bad.id == "" {
		a.log.Warn().Err(bad.err).Int("attempt", bad.attempt).Str("model", bad.model).Msg("assigned job has no id; cannot record its failure")
		return
	}
	a.log.Warn().Err(bad.err).Str("job_id", bad.id).Int("attempt", bad.attempt).Str("model", bad.model).Msg("assigned job failed its schema")
	res := &schemas.ResultMsg{
		Type: "result", JobID: bad.id, Attempt: bad.attempt, Status: schemas.StatusFailed,
		WorkerID: a.cfg.WorkerID, // no model: it may be what broke the schema
		Tenant:   subjects.RecordTenant(bad.tenant),
		Error:    &schemas.ErrorInfo{Code: schemas.CodeInvalidRequest, Message: bad.err.Error()},
	}
	ctx, cancel := context.WithTimeout(a.jobCtx, a.cfg.ResultTimeout+5*time.Second)
	defer cancel()
	a.finish(ctx, res, bad.dispatcherID, "")
}
