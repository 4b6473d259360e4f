package dispatcher

import (
	"encoding/json"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Progress: what the caller received during the running attempt.
//
// A retry after a silent death (settle.go) resumes from what the caller
// received, and the records this dispatcher makes itself (cancelled, expired,
// out of attempts) carry that text. Both must hold only what the job's own
// worker produced. Reply subjects cannot tell that: every worker credential
// may publish on every one of them (it streams tokens there), so a worker
// could plant text in another worker's job — it would reach the retry's
// resume and the stored record. Hence the worker sends each token event
// also to its own progress subject (subjects.Progress), where the server's
// permissions vouch for the worker id, and the dispatcher tracks only those
// events, only from the worker the job is placed on, at that attempt.
//
// What is tracked is bounded (resumeCap): a resume travels in an assignment,
// which the schema caps at 1 MiB of text and the server at its max payload
// with up to MaxBatch jobs. An attempt whose text passes the cap, or whose
// events come with a gap (a lost message: the tracked text would have a hole),
// is no longer tracked: its retry starts over, which the caller's stream
// handles (the next attempt's offset 0 says so).

// maxResumeText is the assignment schema's bound on a resume's text
// (schemas/assignment.json, maxLength, in characters: never fewer than bytes).
const maxResumeText = 1 << 20

// resumeCap is the most JSON-encoded bytes of resume text a job may carry:
// a quarter of the server's max payload (so a job whose body takes less than
// the rest fits an assignment with its resume; batches are sized from both:
// assignsize.go), and never past the schema's bound.
// It is read on every progress event, so it is computed once, from the max
// payload the server announced when the dispatcher was made.
func (d *Dispatcher) resumeCap() int { return d.resumeCapBytes }

// resumeCapFor is resumeCap for a server max payload of maxPayload bytes.
func resumeCapFor(maxPayload int64) int {
	mp := int(maxPayload)
	if mp <= 0 {
		mp = 1 << 20 // the server's default
	}
	return min(maxResumeText, mp/4)
}

// progressOverhead is what a token event holds besides its delta: the type,
// job id, attempt, seq, tokens and offset fields, and logprob entries (a job
// that asked for them sends a few hundred bytes per token with its text).
const progressOverhead = 64 << 10

// progressPending bounds what the progress subscription may hold unread: well
// above what every running job's throttled events amount to, and small enough
// that a flood (a worker credential may publish as much as it likes on its
// own progress subject) costs the dispatcher tens of MiB, not hundreds, before
// the client drops events (slow consumer) — which untracks the attempts that
// lose one, never corrupts them.
const (
	progressPendingMsgs  = 100_000
	progressPendingBytes = 16 << 20
)

// progressEvent is the part of a token event (schemas.TokenEventMsg) that
// tracking reads: decoding only these fields skips the logprob entries a job
// may carry with every event.
type progressEvent struct {
	Type    string `json:"type"`
	JobID   string `json:"job_id"`
	Attempt int    `json:"attempt"`
	Seq     int    `json:"seq"`
	Delta   string `json:"delta"`
	Tokens  int    `json:"tokens"`
	Offset  int    `json:"offset"`
}

// onProgress handles a token event a worker sent the dispatcher that placed
// the job (mlx.worker.<wid>.progress.<this dispatcher>.<tenant>).
func (d *Dispatcher) onProgress(m *nats.Msg) {
	if d.progressHook != nil {
		d.progressHook()
	}
	if !subjects.Sent(m.Reply) {
		d.count().relayed()
		return
	}
	wid, tenant, ok := subjects.ParseProgress(m.Subject)
	if !ok {
		return
	}
	if len(m.Data) > d.resumeCap()+progressOverhead {
		// No event of a job this dispatcher tracks can be this large (its
		// delta alone would pass the cap), so it is not decoded: a worker
		// credential flooding the one progress subscription with large bodies
		// costs a length check each. If it was the job's own worker, the
		// event's seq is missing from what follows, and the gap untracks the
		// attempt, as the cap would have.
		d.count().oversizedProgress()
		return
	}
	var ev progressEvent
	if err := json.Unmarshal(m.Data, &ev); err != nil || ev.Type != "token" {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	j := d.jobs[subjects.JobRef{Tenant: tenant, ID: ev.JobID}.Key()]
	if j == nil || j.gone || ev.Attempt != j.attempt {
		return
	}
	live := j.state == StateRunning || j.state == StateDispatched || (j.state == StateRetrying && j.settling)
	if !live {
		return
	}
	if j.workerID != wid {
		d.count().forged()
		d.rare.Warn().Str("job_id", ev.JobID).Str("tenant", j.tenant).Str("from_worker", wid).Str("worker_id", j.workerID).
			Int("attempt", ev.Attempt).Msg("progress from a worker that does not run this attempt; ignored")
		return
	}
	if w := d.workers[wid]; w != nil {
		w.aliveAt = time.Now()
	}
	j.track(d, &ev)
}

// track adds ev, an event of j's current attempt from its worker, to what the
// caller received; or stops tracking the attempt. Callers hold d.mu.
func (j *job) track(d *Dispatcher, ev *progressEvent) {
	if j.untracked {
		return
	}
	size := jsonSize(ev.Delta)
	switch {
	case ev.Seq != j.nextSeq || ev.Offset != len(j.resume.Text)+j.cur.Len():
		d.jobLog(d.log.Warn(), j).Int("seq", ev.Seq).Int("want", j.nextSeq).Int("offset", ev.Offset).
			Msg("gap in progress events; the attempt is no longer tracked, a retry starts over")
		j.untrack()
	case j.resumeSize+j.curSize+size > d.resumeCap():
		d.jobLog(d.log.Warn(), j).Int("cap", d.resumeCap()).
			Msg("text beyond what a resume may carry; the attempt is no longer tracked, a retry starts over")
		j.untrack()
	default:
		j.cur.WriteString(ev.Delta)
		j.curSize += size
		j.curToks = ev.Tokens
		j.nextSeq = ev.Seq + 1
	}
}

// untrack drops what is known of j's text: the current attempt is no longer
// tracked, and the next one starts over (no resume). Callers hold d.mu.
func (j *job) untrack() {
	j.untracked = true
	j.resume, j.resumeSize = schemas.Resume{}, 0
	j.resetCur()
}

// resetCur forgets the current attempt's tracked text.
func (j *job) resetCur() {
	j.cur.Reset()
	j.curToks, j.curSize = 0, 0
}

// setResume makes r, which an attempt report carries, j's resume, unless it
// is larger than a resume may be: then the next attempt starts over.
func (d *Dispatcher) setResume(j *job, r schemas.Resume) {
	size := jsonSize(r.Text)
	if size > d.resumeCap() {
		d.jobLog(d.log.Warn(), j).Int("cap", d.resumeCap()).Msg("reported text beyond what a resume may carry; the retry starts over")
		r, size = schemas.Resume{}, 0
	}
	j.resume, j.resumeSize = r, size
}

// jsonSize is the length of s as encoding/json writes it (HTML escaping on),
// less the quotes: what its text adds to an assignment.
func jsonSize(s string) int {
	n := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\' || c == '\n' || c == '\r' || c == '\t':
				n += 2
			case c < 0x20 || c == '<' || c == '>' || c == '&':
				n += 6
			default:
				n++
			}
			i++
			continue
		}
		r, w := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && w == 1:
			n += 6 // \ufffd
		case r == '\u2028' || r == '\u2029':
			n += 6
		default:
			n += w
		}
		i += w
	}
	return n
}
