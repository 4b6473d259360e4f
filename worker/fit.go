package worker

import (
	"encoding/json"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// What a job's end must fit in: the one home of "the record fits the bus".
//
// A terminal record travels three times: this worker's hand-over request to
// its dispatcher (subjects.Done, no headers), the dispatcher's JetStream
// publish to RESULTS (results.Finish: the same record re-encoded with the
// worker id, tenant and model it vouches for, plus the Nats-Msg-Id,
// Nats-Expected-Stream and Nats-Expected-Last-Subject-Sequence headers) and
// the same bytes on the reply subject. The server refuses any message larger
// than its max payload, headers included (the client checks len(data)+len(hdr)),
// and RESULTS sets no max message size of its own, so the max payload is the
// bound. A record over it was never stored: the hand-over failed with
// "maximum payload exceeded" after every retry, the attempt was not reported,
// and the job stayed running on its dispatcher with no end (red team F4) — and
// a retry would make the same record again.
//
// So a record that cannot fit ends the job anyway, with one that does: status
// failed, error result_too_large (not retryable: another attempt produces the
// same text), the text cut to the longest prefix that fits (whole UTF-8
// sequences), logprobs dropped (logprobs_truncated), usage, seq, timings and
// finish_reason kept. The caller's token stream already carried every token;
// seq still says how many events there were.
//
// The same bound holds for a text longer than the result schema's maxLength
// (in characters): such a record would fail validation, which used to end
// only as attempts_exhausted hours later.

// recordHeadroom is what a record leaves of the max payload for what the
// dispatcher adds when it stores it: the three JetStream headers, about 300
// bytes with the longest tenant and job id (64 characters each in
// job.json); a tenant re-stamped from the subject the server vouches for
// (tenant pattern: at most 64 bytes); and slack for a model name the
// dispatcher takes from its copy of the job (the same job body the worker
// was assigned, so the same name; 256 characters would escape to 1.5 KiB at
// worst).
const recordHeadroom = 2 << 10

// defaultMaxPayload is the server's default max payload, assumed when the
// connection does not tell (no INFO yet, or no connection in a unit test).
const defaultMaxPayload = 1 << 20

// maxRecordText is the result schema's bound on text, in characters.
const maxRecordText = 1 << 20

// maxPayload is the connection's max payload as the server announced it.
func (a *Agent) maxPayload() int {
	if a.nc != nil {
		if mp := a.nc.MaxPayload(); mp > 0 {
			return int(mp)
		}
	}
	return defaultMaxPayload
}

// recordBudget is the most bytes a terminal record's encoding may take.
func recordBudget(maxPayload int) int { return maxPayload - recordHeadroom }

// fitRecord returns res unchanged when its encoding fits budget and its text
// the schema, and otherwise the failed result_too_large record that replaces
// it (see above), with its encoding. err is json.Marshal's.
func fitRecord(res *schemas.ResultMsg, budget int) (fit *schemas.ResultMsg, data []byte, cut bool, err error) {
	data, err = json.Marshal(res)
	if err != nil {
		return res, nil, false, err
	}
	if len(data) <= budget && utf8.RuneCountInString(res.Text) <= maxRecordText {
		return res, data, false, nil
	}
	c := *res
	c.Status = schemas.StatusFailed
	c.Logprobs = nil
	if res.Logprobs != nil || res.LogprobsTruncated {
		c.LogprobsTruncated = true
	}
	why := "the " + res.Status + " record"
	if res.Error != nil {
		why += " (" + res.Error.Code + ")"
	}
	why += " takes " + strconv.Itoa(len(data)) + " bytes encoded, " + strconv.Itoa(utf8.RuneCountInString(res.Text)) +
		" characters of text; a record may take " + strconv.Itoa(budget) + " bytes (the bus's max payload less headroom) and " +
		strconv.Itoa(maxRecordText) + " characters: its text is cut to the first "
	c.Error = &schemas.ErrorInfo{Code: schemas.CodeResultTooLarge, Message: schemas.ClipUTF8(why, schemas.MaxErrorMessage)}
	c.Text = ""
	base, err := json.Marshal(&c)
	if err != nil {
		return res, nil, false, err
	}
	// The message names the kept length, whose digits add to the record: room
	// for them is kept (len(res.Text) has at least as many digits).
	room := budget - len(base) - len(strconv.Itoa(len(res.Text))) - len(" bytes")
	n := schemas.JSONPrefix(res.Text, room, maxRecordText)
	encode := func(n int) ([]byte, error) {
		c.Text = res.Text[:n]
		c.Error.Message = schemas.ClipUTF8(why+strconv.Itoa(n)+" bytes", schemas.MaxErrorMessage)
		return json.Marshal(&c)
	}
	for {
		if data, err = encode(n); err != nil {
			return res, nil, false, err
		}
		if len(data) <= budget || n == 0 {
			break
		}
		// JSONPrefix matches encoding/json's escaping; this only guards
		// against a difference between the two, one rune at a time.
		_, w := utf8.DecodeLastRuneInString(c.Text)
		n -= w
	}
	if len(data) > budget {
		// With no text at all it is as small as this record gets; should it
		// still not fit (a max payload of a few KiB), the hand-over fails and
		// finish reports the attempt instead.
		return &c, data, true, nil
	}
	// The room kept for the kept length's digits may be more than n needs (n
	// has fewer digits than the whole text's length): the runes that still
	// fit are taken, so the prefix is the longest, a few steps at most.
	for n < len(res.Text) {
		_, w := utf8.DecodeRuneInString(res.Text[n:])
		next, err := encode(n + w)
		if err != nil || len(next) > budget || utf8.RuneCountInString(res.Text[:n+w]) > maxRecordText {
			break
		}
		n, data = n+w, next
	}
	if data, err = encode(n); err != nil {
		return res, nil, false, err
	}
	return &c, data, true, nil
}

// boundReport makes rep fit the bus and its schema: an attempt report is
// published as is (no headers) and the dispatcher ignores one that breaks
// attempt_report.json — a text over its maxLength, or over the max payload,
// left the job running until its attempt_timeout. When it does not fit, the
// report goes without text and tokens: the retry starts over (the next
// attempt's offset 0 tells the caller to drop what it had), which is what
// the dispatcher does anyway with a resume larger than a quarter of the max
// payload (its resumeCap). A cut text would not do: a resume must be exactly
// what the caller received, with its token count. It returns the encoding, or
// ok false when no form of the report passes its schema (an attempt or job id
// outside it: nothing this worker sends would be heard).
func boundReport(rep *schemas.AttemptReportMsg, maxPayload int) (data []byte, ok bool) {
	if data, ok = reportFits(rep, maxPayload); ok {
		return data, true
	}
	rep.Text, rep.CompletionTokens = "", 0
	rep.Seq = max(0, min(rep.Seq, maxReportSeq))
	return reportFits(rep, maxPayload)
}

func reportFits(rep *schemas.AttemptReportMsg, maxPayload int) ([]byte, bool) {
	data, err := json.Marshal(rep)
	if err != nil || len(data) > maxPayload || schemas.Validate(schemas.AttemptReport, data) != nil {
		return nil, false
	}
	return data, true
}

// handOverFailedReport is the attempt report that follows a terminal record
// its dispatcher never took (finish retried until ResultTimeout: the
// dispatcher unreachable, or the record refused on the way, whatever the
// reason). Retryable: another attempt may hand over where this one could not.
// It carries no text: the retry starts over rather than resume after a
// record that may have said completed (a resume past a stop would generate
// beyond it); the caller's stream learns that from the next attempt's offset 0.
func handOverFailedReport(res *schemas.ResultMsg, workerID, dispatcherID string, herr error) *schemas.AttemptReportMsg {
	return &schemas.AttemptReportMsg{
		JobID: res.JobID, Tenant: subjects.RecordTenant(res.Tenant), Attempt: res.Attempt, WorkerID: workerID,
		Error: schemas.ErrorInfo{
			Code:      schemas.CodeHandOverFailed,
			Message:   schemas.ClipUTF8("could not hand the "+res.Status+" record to dispatcher "+dispatcherID+": "+herr.Error(), schemas.MaxErrorMessage),
			Retryable: true,
		},
		Seq:        max(0, min(res.Seq, maxReportSeq)),
		ReportedAt: time.Now().UTC(),
	}
}
