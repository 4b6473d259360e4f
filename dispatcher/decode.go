package dispatcher

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// What the dispatcher reads from others, decoded without I/O: a delivery from
// JOBS, a worker's assignment reply, terminal hand-over and attempt report, a
// cancel. Each is fuzzed (fuzz_test.go): whatever arrives, these never panic,
// and what they accept is what the handlers may trust.

// decodeJob decodes the body of a delivery on ref's subject, or says why it is
// no valid job of that tenant. req is filled as far as the body allows even
// when it is invalid (its reply_to and model, for the failure record).
func decodeJob(ref subjects.JobRef, data []byte) (req schemas.JobRequest, invalid error) {
	if err := schemas.Validate(schemas.Job, data); err != nil {
		_ = json.Unmarshal(data, &req) // best effort
		return req, err
	}
	if err := json.Unmarshal(data, &req); err != nil {
		return req, err
	}
	// The subject's tenant is the one the server's permissions let publish it;
	// a body that claims another, or replies into another's namespace, is an
	// attempt to act as that tenant.
	switch {
	case req.ID != ref.ID:
		return req, fmt.Errorf("job id %q does not match its subject's %q", req.ID, ref.ID)
	case subjects.JobRef{Tenant: req.Tenant}.Key() != subjects.JobRef{Tenant: ref.Tenant}.Key():
		return req, fmt.Errorf("tenant %q does not match its subject's %q", req.Tenant, ref.Tenant)
	case req.Model == "":
		return req, errors.New("model is required")
	case req.ReplyTo == "":
		return req, errors.New("reply_to is required")
	case !subjects.ReplyInTenant(ref.Tenant, req.ReplyTo):
		return req, fmt.Errorf("reply_to %q is not under the tenant's reply subjects %s", req.ReplyTo, subjects.ReplyNamespace(ref.Tenant))
	}
	return req, nil
}

// rawDeadLetter is the dead letter of a message on JOBS that can be no job.
func rawDeadLetter(subject string, data []byte, dispatcherID string, now time.Time) schemas.DLQRecordMsg {
	reason := schemas.ClipUTF8("subject "+strconv.Quote(subject)+" is not mlx.jobs.<tenant>.<priority>.<job-id> with a valid tenant, priority and id", schemas.MaxErrorMessage)
	rec := schemas.DLQRecordMsg{Reason: schemas.CodeNotAJob, LastError: schemas.ErrorInfo{Code: schemas.CodeNotAJob, Message: reason},
		DeadAt: now, RawSubject: schemas.ClipUTF8(subject, 4096), RawData: base64.StdEncoding.EncodeToString(data)}
	if subjects.ValidID(dispatcherID) {
		rec.DispatcherID = dispatcherID
	}
	if rec.RawSubject == "" {
		rec.RawSubject = "?"
	}
	return rec
}

// decodeAssignReply decodes a worker's answer to an assignment; a reply that
// breaks its schema is an error (the batch is then retried), never trusted.
func decodeAssignReply(data []byte) (schemas.AssignmentReplyMsg, error) {
	var r schemas.AssignmentReplyMsg
	if err := schemas.Validate(schemas.AssignmentReply, data); err != nil {
		return r, err
	}
	err := json.Unmarshal(data, &r)
	return r, err
}

// decodeDone decodes a terminal hand-over on mlx.worker.<wid>.done.<did>: the
// worker the server vouches for, and its record, which passes the result schema.
func decodeDone(subject string, data []byte) (wid string, res schemas.ResultMsg, ok bool) {
	wid = subjects.WorkerOf(subject)
	if wid == "" || schemas.Validate(schemas.Result, data) != nil || json.Unmarshal(data, &res) != nil {
		return "", res, false
	}
	return wid, res, true
}

// decodeAttempt decodes an attempt report on mlx.worker.<wid>.attempt.
func decodeAttempt(subject string, data []byte) (wid string, r schemas.AttemptReportMsg, ok bool) {
	wid = subjects.WorkerOf(subject)
	if wid == "" || schemas.Validate(schemas.AttemptReport, data) != nil || json.Unmarshal(data, &r) != nil {
		return "", r, false
	}
	return wid, r, true
}

// decodeCancel decodes a cancel on mlx.cancel.<tenant>.<id>: the job (from the
// subject, which the server's permissions bind to the canceller's tenant) and
// the reason, if the body gives one. A body that is no cancel (schema, or a
// job_id other than the subject's) is refused: a flood of junk on one's own
// cancel subjects then costs no dispatcher memory (d.cancelled).
func decodeCancel(subject string, data []byte) (subjects.JobRef, string, bool) {
	ref, ok := subjects.ParseCancel(subject)
	if !ok {
		return ref, "", false
	}
	var c schemas.CancelMsg
	if schemas.Validate(schemas.Cancel, data) != nil || json.Unmarshal(data, &c) != nil || c.JobID != ref.ID {
		return ref, "", false
	}
	reason := "cancelled by request"
	if c.Reason != "" {
		reason = c.Reason
	}
	return ref, reason, true
}
