package fakeworker

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Plan says how the fake worker runs one attempt. The zero Plan streams the
// job's max_tokens tokens (TokenText) and completes with finish reason length.
type Plan struct {
	Die     int // >0: after this many tokens stop heart-beating and serving, silently
	Restart int // >0: after this many tokens the worker restarts (SIGKILL and back under the same id): its jobs are forgotten, it serves and heart-beats on with a new started_at
	Crash   int // >0: after this many tokens report a retryable failure
	// CrashMessage is that report's error message ("": "boom").
	CrashMessage string
	Block        bool // wait for Release before finishing
	TokenGap     time.Duration

	// Tokens scripts the job's text: token i is Tokens[i] and there are
	// len(Tokens) of them; the terminal's finish reason is then stop. A resumed
	// attempt goes on from the token its Resume counts.
	Tokens []string
	// Status of the terminal ("": completed); ErrCode, when set, its error code.
	Status, ErrCode string
	// Finish overrides the terminal's finish reason.
	Finish string
	// Prompt and Cached are the usage's prompt tokens and, of them, those from
	// the runtime's prompt cache.
	Prompt, Cached int
	// LoseSeq >0: the token event with this seq is not published (lost on the
	// way); the terminal's text has it.
	LoseSeq int
	// Hang: after HangAfter tokens (0: before the first) the attempt goes quiet
	// for good: no more tokens, no terminal, no report. It holds its slot.
	Hang      bool
	HangAfter int

	// StartOver, in Direct mode (a dispatcher decides it itself): the retry after a Crash starts over at offset 0 instead of
	// resuming, as when the dispatcher that knew what was sent died.
	StartOver bool
}

// TokenText is the deterministic text of token i.
func TokenText(i int) string { return fmt.Sprintf("t%d ", i) }

// FullText is the text of tokens 0 to n-1.
func FullText(n int) string {
	var b strings.Builder
	for i := range n {
		b.WriteString(TokenText(i))
	}
	return b.String()
}

// Logprob is the entry the fake worker reports for token d, the job's i-th,
// when the job asks for logprobs: logprob -(i+1)/10 and job.Logprobs
// alternatives d, d', d”, ... at -(i+1+k)/10. Nil when it does not ask.
func Logprob(job schemas.JobRequest, i int, d string) []schemas.TokenLogprob {
	if job.Logprobs == nil {
		return nil
	}
	b := make([]int, len(d))
	for k := range len(d) {
		b[k] = int(d[k])
	}
	e := schemas.TokenLogprob{Token: d, Logprob: -float64(i+1) / 10, Bytes: b, TopLogprobs: []schemas.TopLogprob{}}
	for k := range *job.Logprobs {
		e.TopLogprobs = append(e.TopLogprobs, schemas.TopLogprob{Token: d + strings.Repeat("'", k), Logprob: -float64(i+1+k) / 10, Bytes: b})
	}
	return []schemas.TokenLogprob{e}
}

// outcome is how an attempt ended: a terminal record to hand over, a
// retryable failure to report, or neither (it went quiet: Die, Restart, Hang,
// or its incarnation ended).
type outcome struct {
	res   *schemas.ResultMsg
	crash *schemas.AttemptReportMsg
}

// attempt streams aj's token events to the job's reply subject as plan says,
// like the real worker: offsets in the job's text, seq from 0 per attempt, and
// each event also to progress (subjects.Progress, for the dispatcher that
// placed the job; "" in Direct mode, where there is none).
func (w *Worker) attempt(aj schemas.AssignedJob, plan Plan, inc int, progress string) outcome {
	job := aj.Job
	start, text := 0, ""
	if aj.Resume != nil {
		start, text = aj.Resume.CompletionTokens, aj.Resume.Text
	}
	end, tokenText := job.MaxTokens, TokenText
	if plan.Tokens != nil {
		end, tokenText = len(plan.Tokens), func(i int) string { return plan.Tokens[i] }
	}
	var lps []schemas.TokenLogprob // this attempt's, as the real worker's result has them
	seq := 0
	for i := start; i < end; i++ {
		if plan.Hang && seq == plan.HangAfter {
			_ = w.nc.Flush()
			return outcome{}
		}
		if plan.TokenGap > 0 {
			time.Sleep(plan.TokenGap)
		}
		if !w.current(inc) {
			return outcome{}
		}
		d := tokenText(i)
		ev := schemas.TokenEventMsg{Type: "token", JobID: job.ID, Attempt: aj.Attempt, Seq: seq, Delta: d, Tokens: i + 1,
			Offset: len(text), Logprobs: Logprob(job, i, d)}
		lps = append(lps, ev.Logprobs...)
		text += d
		if plan.LoseSeq == 0 || seq != plan.LoseSeq {
			data, _ := json.Marshal(ev)
			_ = w.nc.Publish(job.ReplyTo, data)
			if progress != "" {
				_ = w.nc.PublishRequest(progress, w.mark, data) // subjects.Sent, as the real worker
			}
		}
		seq++
		if plan.Restart > 0 && seq == plan.Restart {
			_ = w.nc.Flush()
			w.RestartNow()
			return outcome{}
		}
		if plan.Die > 0 && seq == plan.Die {
			_ = w.nc.Flush()
			w.Stop() // silent death: no result, no report, no more heartbeats
			return outcome{}
		}
		if plan.Crash > 0 && seq == plan.Crash {
			msg := plan.CrashMessage
			if msg == "" {
				msg = "boom"
			}
			return outcome{crash: &schemas.AttemptReportMsg{JobID: job.ID, Tenant: job.Tenant, Attempt: aj.Attempt, WorkerID: w.opts.ID,
				Error: schemas.ErrorInfo{Code: "runtime_crashed", Message: msg, Retryable: true}, Text: text, Seq: seq, CompletionTokens: i + 1, ReportedAt: time.Now().UTC()}}
		}
	}
	if plan.Hang {
		_ = w.nc.Flush()
		return outcome{}
	}
	if plan.Block {
		<-w.release
	}
	if !w.current(inc) {
		return outcome{}
	}
	return outcome{res: w.record(aj, plan, text, seq, end, lps)}
}

// record is the attempt's terminal record, stamped finished now.
func (w *Worker) record(aj schemas.AssignedJob, plan Plan, text string, seq, tokens int, lps []schemas.TokenLogprob) *schemas.ResultMsg {
	job := aj.Job
	status, finish := plan.Status, plan.Finish
	if status == "" {
		status = schemas.StatusCompleted
	}
	if finish == "" && status == schemas.StatusCompleted {
		finish = "length"
		if plan.Tokens != nil {
			finish = "stop"
		}
	}
	res := &schemas.ResultMsg{Type: "result", JobID: job.ID, Attempt: aj.Attempt, Seq: seq, Status: status, FinishReason: finish, Text: text,
		Usage:    schemas.Usage{PromptTokens: plan.Prompt, CompletionTokens: tokens, TotalTokens: plan.Prompt + tokens, CachedTokens: plan.Cached},
		Logprobs: lps, Model: job.Model, Tenant: job.Tenant, WorkerID: w.opts.ID, FinishedAt: time.Now().UTC()}
	if plan.ErrCode != "" {
		res.Error = &schemas.ErrorInfo{Code: plan.ErrCode, Message: "fake failure: " + plan.ErrCode}
	}
	return res
}

// run is one assigned attempt: like the real worker, the slot is freed before
// a failure is reported or the record handed to the dispatcher that placed the
// job, which stores it, sends the terminal event and acks.
func (w *Worker) run(aj schemas.AssignedJob, dispatcherID string, inc int) {
	o := w.attempt(aj, w.opts.Plan(aj), inc, subjects.Progress(w.opts.ID, dispatcherID, aj.Job.Tenant))
	switch {
	case o.crash != nil:
		rep, _ := json.Marshal(o.crash)
		w.done(inc)
		_ = w.nc.PublishRequest(subjects.Attempt(w.opts.ID), w.mark, rep)
	case o.res != nil:
		w.done(inc)
		w.handOver(o.res, dispatcherID, aj.Placement)
	}
}

// handOver hands res to the dispatcher that placed it; when that one is gone
// (no responder), a completed record is offered for adoption with the
// assignment's placement token, as the real worker does (worker/adopt.go).
func (w *Worker) handOver(res *schemas.ResultMsg, dispatcherID, placement string) {
	data, _ := json.Marshal(res)
	msg := nats.NewMsg(subjects.Done(w.opts.ID, dispatcherID))
	msg.Data = data
	m, err := w.nc.RequestMsg(msg, w.opts.HandOverTimeout)
	unanswered := errors.Is(err, nats.ErrNoResponders) || errors.Is(err, nats.ErrTimeout) // as worker.handOverUnanswered
	if unanswered && placement != "" && res.Status == schemas.StatusCompleted && !w.opts.NoAdopt {
		msg = nats.NewMsg(subjects.Adopt(w.opts.ID))
		msg.Data = data
		msg.Header.Set(subjects.HeaderPlacement, placement)
		m, err = w.nc.RequestMsg(msg, w.opts.HandOverTimeout)
	}
	var reply schemas.FinishReplyMsg
	if err == nil {
		err = json.Unmarshal(m.Data, &reply)
	}
	// Busy: not read; tried again, as the real worker does (worker/job.go).
	for deadline := time.Now().Add(w.opts.HandOverTimeout); err == nil && reply.Status == schemas.FinishBusy && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
		if m, err = w.nc.RequestMsg(msg, w.opts.HandOverTimeout); err == nil {
			reply = schemas.FinishReplyMsg{}
			err = json.Unmarshal(m.Data, &reply)
		}
	}
	switch {
	case err != nil:
		w.errs.Add(1)
		if w.opts.Logf != nil && !errors.Is(err, nats.ErrNoResponders) { // a stopped dispatcher
			w.opts.Logf("worker %s: hand over %s: %v", w.opts.ID, res.JobID, err)
		}
	case reply.Status != schemas.FinishStored:
		w.errs.Add(1)
		w.mu.Lock()
		w.stats.Refused = append(w.stats.Refused, res.JobID+":"+reply.Status)
		w.mu.Unlock()
	}
}
