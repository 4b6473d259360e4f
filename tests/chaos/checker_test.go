package chaos

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// report is the checker's verdict on a run. Every list names the jobs (with
// the evidence) that broke one promise; any entry fails the run.
type report struct {
	jobs       int
	faults     map[string]int
	statuses   map[string]int // terminal status (and error code when not completed)
	retries    int            // jobs whose terminal came from attempt > 1
	migrations int            // callers that saw a Restarted event
	rewinds    int            // callers whose text an attempt that started over rewound
	recovered  int            // callers whose terminal came from RESULTS, not the reply subject
	missedJobs int            // callers with events known lost (text not comparable)
	watched    int            // callers that re-attached after an unknown submit outcome
	dlq        int
	queuedLeft uint64 // JOBS messages left after the drain
	wireLost   int64  // messages the monitor lost (wire checks are weaker then)
	duration   time.Duration

	notSubmitted []string
	lost         []string // no terminal record in RESULTS
	dupTerminals []string // more than one record, or more than one terminal event
	ranAgain     []string // ran (assigned, streamed or reported) after its terminal was recorded
	unmarkedGaps []string // a caller's (attempt, seq) jumped without Restarted/Missed
	textMismatch []string // a gap-free caller's text differs from the terminal's
	wrongResult  []string // a caller's terminal differs from the stored record
	// callerTerminals: callers that did not get exactly one terminal event.
	callerTerminals []string
	notCompleted    []string // terminal status other than completed
	streamErrs      []string
}

func (r *report) failures() []string {
	var out []string
	add := func(name string, l []string) {
		if len(l) > 0 {
			out = append(out, fmt.Sprintf("%s: %d, e.g. %s", name, len(l), strings.Join(l[:min(len(l), 5)], "; ")))
		}
	}
	add("not submitted", r.notSubmitted)
	add("lost", r.lost)
	add("duplicate terminals", r.dupTerminals)
	add("callers without exactly one terminal", r.callerTerminals)
	add("ran again after completion", r.ranAgain)
	add("unmarked gaps", r.unmarkedGaps)
	add("text mismatches", r.textMismatch)
	add("caller terminal differs from RESULTS", r.wrongResult)
	add("not completed", r.notCompleted)
	add("stream errors", r.streamErrs)
	if r.queuedLeft > 0 {
		out = append(out, fmt.Sprintf("JOBS still holds %d messages after the drain", r.queuedLeft))
	}
	return out
}

// table renders the summary.
func (r *report) table() string {
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	row := func(k string, v any) { fmt.Fprintf(tw, "  %s\t%v\n", k, v) }
	row("jobs", r.jobs)
	kinds := make([]string, 0, len(r.faults))
	total := 0
	for k, n := range r.faults {
		kinds = append(kinds, k)
		total += n
	}
	sort.Strings(kinds)
	row("faults injected", total)
	for _, k := range kinds {
		row("  "+k, r.faults[k])
	}
	sts := make([]string, 0, len(r.statuses))
	for k := range r.statuses {
		sts = append(sts, k)
	}
	sort.Strings(sts)
	for _, k := range sts {
		row("terminal "+k, r.statuses[k])
	}
	row("retries (terminal attempt > 1)", r.retries)
	row("migrations (caller saw Restarted)", r.migrations)
	row("rewinds (an attempt started over)", r.rewinds)
	row("terminals recovered from RESULTS", r.recovered)
	row("callers with missed events", r.missedJobs)
	row("callers re-attached by Watch", r.watched)
	row("dead letters", r.dlq)
	row("lost (must be 0)", len(r.lost))
	row("duplicate terminals (must be 0)", len(r.dupTerminals))
	row("callers without one terminal (must be 0)", len(r.callerTerminals))
	row("ran again after completion (must be 0)", len(r.ranAgain))
	row("unmarked gaps (must be 0)", len(r.unmarkedGaps))
	row("text mismatches (must be 0)", len(r.textMismatch))
	row("caller terminal != RESULTS (must be 0)", len(r.wrongResult))
	row("not completed (must be 0)", len(r.notCompleted))
	row("stream errors (must be 0)", len(r.streamErrs))
	row("JOBS left after drain (must be 0)", r.queuedLeft)
	row("monitor messages lost", r.wireLost)
	row("duration", r.duration.Round(time.Second))
	tw.Flush()
	return b.String()
}

// check verifies every promise against the callers' records, the wire and the
// streams themselves. The wire checks only convict: a monitor that missed
// messages can hide a violation, never invent one.
//
// settle is how long JOBS may take to empty: a job's message is acked after
// its terminal (and an ack lost to a fault is redone at the next delivery,
// one ack wait later), so an instant look would convict too early.
func check(ctx context.Context, js jetstream.JetStream, h *history, faults map[string]int, settle time.Duration) (*report, error) {
	sctx, cancel := context.WithTimeout(ctx, settle)
	_ = poll(sctx, 250*time.Millisecond, func() bool {
		n, err := streamMsgs(sctx, js, subjects.StreamJobs)
		return err == nil && n == 0
	})
	cancel()
	h.mu.Lock()
	defer h.mu.Unlock()
	r := &report{jobs: len(h.callers), faults: faults, statuses: map[string]int{}, wireLost: h.dropped.Load()}

	counts, err := resultCounts(ctx, js)
	if err != nil {
		return nil, err
	}
	if r.dlq, err = streamMsgs(ctx, js, subjects.StreamDLQ); err != nil {
		return nil, err
	}
	if n, err := streamMsgs(ctx, js, subjects.StreamJobs); err != nil {
		return nil, err
	} else {
		r.queuedLeft = uint64(n)
	}

	ids := make([]string, 0, len(h.callers))
	for id := range h.callers {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		c := h.callers[id]
		w := h.wire[id]
		if w == nil {
			w = &wireRec{}
		}
		if c.watched {
			r.watched++
		}
		if c.submitTries > 0 && c.events == nil && c.streamErr == nil && c.submitErr != nil {
			r.notSubmitted = append(r.notSubmitted, fmt.Sprintf("%s (%v)", id, c.submitErr))
			continue
		}
		stored, err := results.Fetch(ctx, js, "", id) // the campaign's jobs name no tenant
		if errors.Is(err, bus.ErrNoResult) {
			r.lost = append(r.lost, fmt.Sprintf("%s (%s, caller err %v)", id, w.story(h.start), c.streamErr))
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("fetch result %s: %w", id, err)
		}
		if n := counts[subjects.Result("", id)]; n != 1 {
			r.dupTerminals = append(r.dupTerminals, fmt.Sprintf("%s: %d records in RESULTS", id, n))
		}
		if len(w.replyTerminals) > 1 {
			r.dupTerminals = append(r.dupTerminals, fmt.Sprintf("%s: %d terminal events on the reply subject (attempts %v)", id, len(w.replyTerminals), attempts(w.replyTerminals)))
		}
		if c.terminals != 1 {
			r.callerTerminals = append(r.callerTerminals, fmt.Sprintf("%s: caller saw %d terminals (err %v)", id, c.terminals, c.streamErr))
		}
		if c.streamErr != nil {
			r.streamErrs = append(r.streamErrs, fmt.Sprintf("%s: %v", id, c.streamErr))
		}

		key := stored.Status
		if stored.Status != schemas.StatusCompleted {
			code := ""
			if stored.Error != nil {
				code = stored.Error.Code
			}
			key += " " + code
			r.notCompleted = append(r.notCompleted, fmt.Sprintf("%s: %s %s attempt %d (%v)", id, stored.Status, code, stored.Attempt, errMsg(stored.Error)))
		}
		r.statuses[key]++
		if stored.Attempt > 1 {
			r.retries++
		}
		if c.restarted > 0 {
			r.migrations++
		}
		if c.rewinds > 0 {
			r.rewinds++
		}
		if c.recovered {
			r.recovered++
		}
		if c.result != nil && (c.result.Attempt != stored.Attempt || c.result.Status != stored.Status || c.result.Text != stored.Text) {
			r.wrongResult = append(r.wrongResult, fmt.Sprintf("%s: caller attempt %d %s %q, stored attempt %d %s %q",
				id, c.result.Attempt, c.result.Status, c.result.Text, stored.Attempt, stored.Status, stored.Text))
		}

		// Ran again: anything of a later attempt after the stored record was written.
		var tTerm time.Time
		for _, e := range w.resultWrites {
			if e.attempt == stored.Attempt && e.status == stored.Status {
				tTerm = e.at
				break
			}
		}
		if !tTerm.IsZero() {
			var ev []string
			for _, e := range w.assigns {
				if e.at.After(tTerm) && e.attempt > stored.Attempt {
					ev = append(ev, fmt.Sprintf("assigned attempt %d to %s %s after", e.attempt, e.worker, e.at.Sub(tTerm)))
				}
			}
			for _, e := range w.attemptReports {
				if e.at.After(tTerm) && e.attempt > stored.Attempt {
					ev = append(ev, fmt.Sprintf("attempt %d reported by %s %s after", e.attempt, e.worker, e.at.Sub(tTerm)))
				}
			}
			for _, e := range w.tokens {
				if e.at.After(tTerm) && e.attempt > stored.Attempt {
					ev = append(ev, fmt.Sprintf("token of attempt %d %s after", e.attempt, e.at.Sub(tTerm)))
					break
				}
			}
			if len(ev) > 0 {
				r.ranAgain = append(r.ranAgain, fmt.Sprintf("%s (terminal attempt %d by %s): %s", id, stored.Attempt, stored.WorkerID, strings.Join(ev, ", ")))
			}
		}

		if g := unmarkedGap(c.events); g != "" {
			r.unmarkedGaps = append(r.unmarkedGaps, id+": "+g)
		}
		if c.missed > 0 {
			r.missedJobs++
		} else if c.result != nil && c.text.String() != stored.Text {
			r.textMismatch = append(r.textMismatch, fmt.Sprintf("%s: caller %q, terminal %q (attempt %d, caller restarts %d, events %s; %s)",
				id, c.text.String(), stored.Text, stored.Attempt, c.restarted, eventsString(c.events), w.story(h.start)))
		}
	}
	return r, nil
}

// unmarkedGap finds an event whose (attempt, seq) does not follow the previous
// one and that carries neither Restarted nor Missed.
func unmarkedGap(evs []eventRec) string {
	att, next := 0, 0
	for i, e := range evs {
		switch {
		case i == 0:
			if e.seq != 0 && e.missed == 0 {
				return fmt.Sprintf("first event (attempt %d, seq %d) unmarked", e.attempt, e.seq)
			}
		case e.attempt > att:
			if !e.restarted {
				return fmt.Sprintf("attempt %d→%d without Restarted", att, e.attempt)
			}
			if e.seq != 0 && e.seq != next && e.missed == 0 {
				return fmt.Sprintf("attempt %d starts at seq %d, expected 0 or %d, unmarked", e.attempt, e.seq, next)
			}
		case e.attempt == att:
			if e.seq != next && e.missed == 0 {
				return fmt.Sprintf("attempt %d seq %d after %d, unmarked", e.attempt, e.seq, next-1)
			}
		default:
			if !e.terminal {
				return fmt.Sprintf("event of attempt %d after attempt %d", e.attempt, att)
			}
		}
		if e.attempt >= att {
			att, next = e.attempt, e.seq+1
		}
	}
	return ""
}

func eventsString(evs []eventRec) string {
	var b strings.Builder
	for _, e := range evs {
		fmt.Fprintf(&b, "(%d,%d", e.attempt, e.seq)
		if e.restarted {
			b.WriteString(",R")
		}
		if e.missed > 0 {
			fmt.Fprintf(&b, ",M%d", e.missed)
		}
		if e.terminal {
			b.WriteString(",T")
		}
		b.WriteString(")")
	}
	return b.String()
}

// story tells what the wire saw of a job, times relative to the run's start.
func (w *wireRec) story(start time.Time) string {
	var parts []string
	at := func(t time.Time) string { return t.Sub(start).Round(time.Millisecond).String() }
	for _, e := range w.assigns {
		parts = append(parts, fmt.Sprintf("assigned attempt %d to %s at %s", e.attempt, e.worker, at(e.at)))
	}
	for _, e := range w.attemptReports {
		parts = append(parts, fmt.Sprintf("attempt %d reported %s by %s at %s", e.attempt, e.status, e.worker, at(e.at)))
	}
	for _, e := range w.resultWrites {
		parts = append(parts, fmt.Sprintf("result write attempt %d %s by %s at %s", e.attempt, e.status, e.worker, at(e.at)))
	}
	if len(w.tokens) > 0 {
		parts = append(parts, fmt.Sprintf("%d token events %s..%s", len(w.tokens), at(w.tokens[0].at), at(w.tokens[len(w.tokens)-1].at)))
	}
	if len(parts) == 0 {
		return "nothing on the wire"
	}
	return strings.Join(parts, ", ")
}

func attempts(evs []wireEv) []string {
	var out []string
	for _, e := range evs {
		s := fmt.Sprintf("%d", e.attempt)
		if e.worker != "" {
			s += "@" + e.worker
		}
		if e.status != "" {
			s += ":" + e.status
		}
		out = append(out, s)
	}
	return out
}

func errMsg(e *schemas.ErrorInfo) string {
	if e == nil {
		return ""
	}
	return e.Message
}

// resultCounts counts the records per subject in RESULTS.
func resultCounts(ctx context.Context, js jetstream.JetStream) (map[string]uint64, error) {
	s, err := js.Stream(ctx, subjects.StreamResults)
	if err != nil {
		return nil, err
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(subjects.ResultsAll))
	if err != nil {
		return nil, err
	}
	return info.State.Subjects, nil
}

func streamMsgs(ctx context.Context, js jetstream.JetStream, name string) (int, error) {
	s, err := js.Stream(ctx, name)
	if err != nil {
		return 0, err
	}
	info, err := s.Info(ctx)
	if err != nil {
		return 0, err
	}
	return int(info.State.Msgs), nil
}
