package worker

import (
	"encoding/json"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// maxReportSeq is the attempt report schema's bound on seq
// (attempt_report.json), which a report made from an invalid terminal record
// may exceed; its error message is clipped to schemas.MaxErrorMessage.
const maxReportSeq = 1048576

// invalidRecordReport is the attempt report that replaces a terminal record
// that failed its own schema (verr says why; a runtime's error message longer
// than the schema allows is one way). Dropping the record left the job
// running on its dispatcher, in-progress-acked for ever; reported, the
// attempt counts as failed and the dispatcher retries it or, out of attempts,
// ends the job with its own record: exactly one terminal either way.
//
// Not retryable: invalid_message is not in codes/errors.json, and a record
// that broke its schema is most likely to break it again. The dispatcher
// still retries every reported attempt up to MaxAttempts (a record that broke
// by chance — this sampling's output, a transient runtime message — may pass
// next time), then dead-letters the job with attempts_exhausted and this
// error as the last.
//
// The report carries what the record says the caller has (text, seq, tokens)
// so a retry resumes there; when that breaks the report's schema too (text
// over its bound), it starts over instead: no text, no tokens, and the next
// attempt's offsets tell the caller to drop what it had. A report that is
// still invalid — an attempt number outside the schema, which the
// dispatcher's clamp rules out — is returned with ok false: nothing this
// worker can send would be heard.
func invalidRecordReport(res *schemas.ResultMsg, workerID string, verr error) (rep *schemas.AttemptReportMsg, ok bool) {
	rep = &schemas.AttemptReportMsg{
		JobID: res.JobID, Tenant: subjects.RecordTenant(res.Tenant), Attempt: res.Attempt, WorkerID: workerID,
		Error: schemas.ErrorInfo{
			Code:    schemas.CodeInvalidMessage,
			Message: schemas.ClipUTF8("the worker's terminal record ("+res.Status+") fails its schema: "+verr.Error(), schemas.MaxErrorMessage),
		},
		Text:             res.Text,
		Seq:              res.Seq,
		CompletionTokens: res.Usage.CompletionTokens,
		ReportedAt:       res.FinishedAt,
	}
	if validReport(rep) {
		return rep, true
	}
	rep.Text, rep.CompletionTokens = "", 0
	rep.Seq = max(0, min(rep.Seq, maxReportSeq))
	return rep, validReport(rep)
}

func validReport(rep *schemas.AttemptReportMsg) bool {
	data, err := json.Marshal(rep)
	return err == nil && schemas.Validate(schemas.AttemptReport, data) == nil
}
