package bus

// What a job stream takes as an event of its job: accept orders token and
// result events by (attempt, seq) and drops what is another job's, stale,
// repeated or out of the schemas' bounds; confirm and lookup hand over a
// terminal only as the stored record (RESULTS), never as a message alone.

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// accept decodes one message and places it in the (attempt, seq) order; ok is
// false for messages to drop: undecodable, another job's, stale or repeated.
// Bounds of attempt and seq, as the schemas have them. The stream does arithmetic
// on both, so an event outside them (not from a worker of ours) is dropped before
// it could overflow the gap count.
const (
	maxAttempt = 100
	maxSeq     = 1 << 20
	maxOffset  = 1 << 24
)

func inRange(attempt, seq int) bool {
	return attempt >= 1 && attempt <= maxAttempt && seq >= 0 && seq <= maxSeq
}

func (s *JobStream) accept(data []byte) (Event, bool) {
	var probe struct {
		Type  string `json:"type"`
		JobID string `json:"job_id"`
	}
	if err := json.Unmarshal(data, &probe); err != nil || probe.JobID != s.jobID {
		return Event{}, false
	}
	switch probe.Type {
	case "token":
		var tok schemas.TokenEventMsg
		if err := json.Unmarshal(data, &tok); err != nil || !inRange(tok.Attempt, tok.Seq) || tok.Offset < 0 || tok.Offset > maxOffset {
			return Event{}, false
		}
		ev := Event{Token: &tok, Attempt: tok.Attempt}
		rewind := false // an attempt that starts over, below the text held
		switch {
		case tok.Attempt < s.attempt:
			return Event{}, false // a superseded attempt still talking
		case tok.Attempt > s.attempt:
			ev.Restarted = s.attempt != 0
			// A resumed attempt may continue the numbering or start at 0; both are
			// whole. Only a start past what was expected shows a loss.
			if tok.Seq != 0 && tok.Seq > s.next {
				ev.Missed = tok.Seq - s.next
			}
			// Seq starts again at 0 with each attempt: an attempt that resumes
			// past the text that arrived shows the loss by its offset (red team
			// round 21: it was appended as if seamless, Missed 0).
			if ev.Missed == 0 && tok.Offset > s.textLen {
				ev.Missed = 1
			}
			rewind = tok.Offset < s.textLen
			s.attempt = tok.Attempt
		default:
			if tok.Seq < s.next {
				return Event{}, false // repeated delivery
			}
			ev.Missed = tok.Seq - s.next
		}
		s.next = tok.Seq + 1
		s.missed += ev.Missed
		s.textLen = tok.Offset + len(tok.Delta)
		ev.StartedOver = rewind
		ev.Drop, ev.CharOffset = s.text.token(&tok, rewind, tok.Offset)
		return ev, true
	case "result":
		var res schemas.ResultMsg
		if err := json.Unmarshal(data, &res); err != nil || !inRange(max(res.Attempt, 1), res.Seq) {
			return Event{}, false
		}
		// Only the winner of RESULTS publishes a terminal, so any result is the one.
		ev := Event{Result: &res, Attempt: res.Attempt}
		if res.Attempt > s.attempt && s.attempt != 0 {
			ev.Restarted = true
		}
		if res.Attempt >= s.attempt && res.Seq > s.next {
			ev.Missed = res.Seq - s.next
		}
		// Not added to s.missed: the terminal handed over for it (terminal,
		// after confirm) counts the same gap.
		return ev, true
	}
	return Event{}, false
}

// confirm hands over the stored record for a terminal event seen on the reply
// subject: what a caller gets as the end of its job is always the durable
// record, never only a message. Anyone allowed to publish on the reply subject
// (a worker credential streams tokens there) could send a "result"; a terminal
// event with no record behind it is dropped (ok false) and the wait goes on
// (the quiet-period lookup finds the real one). The dispatcher sends the event
// only after the record is stored; a replica answering the direct get may lag
// a moment, hence a few tries.
func (s *JobStream) confirm(ctx context.Context, ev Event) (Event, bool) {
	for try := 0; ; try++ {
		stored, ok, err := s.lookup(ctx)
		if err == nil && ok {
			stored.Recovered = false
			return stored, true
		}
		if try == confirmTries-1 || ctx.Err() != nil {
			return ev, false
		}
		select {
		case <-ctx.Done():
			return ev, false
		case <-time.After(confirmGap):
		}
	}
}

// confirmTries and confirmGap bound how long a terminal event waits for its
// record to be readable.
const (
	confirmTries = 5
	confirmGap   = 50 * time.Millisecond
)

// lookup reads the job's RESULTS record; ok is false when there is none yet.
func (s *JobStream) lookup(ctx context.Context) (Event, bool, error) {
	res, err := results.Fetch(ctx, s.js, s.tenant, s.jobID)
	if errors.Is(err, ErrNoResult) {
		return Event{}, false, nil
	}
	if err != nil {
		return Event{}, false, err
	}
	ev := s.terminal(res)
	s.finish()
	return ev, true, nil
}

// terminal is the event that hands over the stored record res. Every terminal
// handed over is made here (confirm's too), so the caller's text is reconciled
// with the record's exactly once.
func (s *JobStream) terminal(res *schemas.ResultMsg) Event {
	ev := Event{Result: res, Attempt: res.Attempt, Recovered: true}
	ev.Drop, ev.Rest, ev.CharOffset = s.text.result(res.Text)
	if res.Attempt > s.attempt && s.attempt != 0 {
		ev.Restarted = true
	}
	if res.Attempt >= s.attempt && res.Seq > s.next {
		ev.Missed = res.Seq - s.next
	}
	s.missed += ev.Missed
	return ev
}

// lastLookup hands over a terminal that exists although its event was not seen,
// even though ctx has ended; otherwise it reports cause.
func (s *JobStream) lastLookup(ctx context.Context, cause error) (Event, error) {
	lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.opts.FinalLookup)
	defer cancel()
	// The terminal may already be buffered behind deltas the caller no longer
	// waits for; those deltas are skipped unread, so the caller's text does not
	// count them and the terminal's Rest carries their text.
	for {
		msg, err := s.q.take()
		if errors.Is(err, errDropped) {
			continue
		}
		if msg == nil || err != nil {
			break
		}
		if msg.Subject != s.replyTo {
			continue
		}
		var probe struct {
			Type string `json:"type"`
		}
		if json.Unmarshal(msg.Data, &probe) != nil || probe.Type != "result" {
			continue
		}
		if ev, ok := s.accept(msg.Data); ok && ev.Terminal() {
			if ev, ok = s.confirm(lctx, ev); ok {
				s.finish()
				return ev, nil
			}
		}
	}
	if ev, ok, err := s.lookup(lctx); err == nil && ok {
		return ev, nil
	}
	return Event{}, cause
}
