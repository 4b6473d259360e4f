package bus

import (
	"unicode/utf8"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// Event is one event of a job's stream: a text delta (Token) or the terminal
// record (Result). Exactly one of Token and Result is set.
//
// The stream keeps the text its caller has been given (Text, Logprobs) and
// hands events over as changes to it, across retries: after taking back Drop
// (almost always zero), a caller that appends every Token.Delta and the
// terminal's Rest holds exactly Result.Text, and with every Token.Logprobs the
// entries that came with that text. A retried attempt that resumes repeats
// nothing; one that starts over and regenerates text the caller has yields
// empty deltas until it passes that text.
type Event struct {
	// Token is the token event as its caller applies it: Delta and Logprobs are
	// what is new to the caller (possibly empty, while a restarted attempt
	// regenerates what it has), Offset is where Delta starts in the caller's
	// text. Attempt, Seq and Tokens are the worker's.
	Token  *schemas.TokenEventMsg
	Result *schemas.ResultMsg
	// Attempt is the attempt the event belongs to (0 for a result of a job that
	// never ran).
	Attempt int
	// Restarted marks the first event of a new attempt after events of an earlier
	// one were seen: the job was retried or migrated.
	Restarted bool
	// Missed counts events known lost just before this one, from the (attempt,
	// seq) numbering. The terminal's Rest makes their text good.
	Missed int
	// Recovered marks a Result read from the RESULTS stream because its event on
	// the reply subject was not seen.
	Recovered bool
	// StartedOver marks the first event of an attempt that began below the text
	// already given: it started over (its dispatcher died with what was sent).
	// It is for the record only: what it regenerates is swallowed, and Drop says
	// whether anything must be taken back.
	StartedOver bool
	// Drop is what to take back before appending this event's text: non-zero
	// only where the text given so far is not how the job's text begins (see
	// Drop).
	Drop Drop
	// CharOffset is where this event's text (Token.Delta, or the terminal's
	// Rest) starts in the caller's text after Drop, in characters (Token.Offset
	// counts bytes): what OpenAI's text_offset counts.
	CharOffset int
	// Rest, on the terminal event, is the end of Result.Text the caller was not
	// given as deltas (events lost on the way, a terminal read from RESULTS).
	// No logprob entries come with it: Result.Logprobs is the record's own,
	// bounded copy.
	Rest string
}

// Terminal reports whether e is the job's terminal event.
func (e Event) Terminal() bool { return e.Result != nil }

// Drop is what a caller must take back before appending an event's text: the
// last Bytes bytes of the text it was given (Chars characters, the same span
// counted in runes) and the last Entries logprob entries. The zero Drop takes
// nothing back, and that is what almost every event carries.
//
// A Drop is needed only where a retry cannot be hidden: the caller was given
// text that the job's text no longer begins with (an attempt that had to start
// over generated something else, or events were lost and the terminal record
// differs from what arrived). It always covers whole deltas the caller was
// given, so the entries it takes back are exactly those that came with the
// bytes it takes back. A caller that cannot take text back (an HTTP response
// already sent) treats a Drop as the end of a coherent stream.
type Drop struct {
	Bytes, Chars, Entries int
}

// Any reports whether d takes anything back.
func (d Drop) Any() bool { return d.Bytes > 0 || d.Entries > 0 }

// textLog is text built from deltas; each delta is a segment with the logprob
// entries that came with it, so text and entries are cut together.
type textLog struct {
	text    []byte
	chars   int // runes in text
	entries []schemas.TokenLogprob
	segs    []segment
}

// segment is one delta: where its text starts, and its first entry.
type segment struct{ start, entry int }

func (l *textLog) add(delta string, lps []schemas.TokenLogprob) {
	if delta == "" && len(lps) == 0 {
		return
	}
	l.segs = append(l.segs, segment{start: len(l.text), entry: len(l.entries)})
	l.text = append(l.text, delta...)
	l.chars += utf8.RuneCountInString(delta)
	l.entries = append(l.entries, lps...)
}

// end is where segment i's text ends.
func (l *textLog) end(i int) int {
	if i+1 < len(l.segs) {
		return l.segs[i+1].start
	}
	return len(l.text)
}

// truncate keeps the text before off and the segments that start before it,
// with their entries (a segment cut in the middle keeps its entries).
func (l *textLog) truncate(off int) {
	off = min(off, len(l.text))
	n := len(l.segs)
	for n > 0 && l.segs[n-1].start >= off {
		n--
	}
	l.cutSegs(n)
	l.chars -= utf8.RuneCount(l.text[off:])
	l.text = l.text[:off]
}

// cutSegs drops segments n.. and their entries (not their text).
func (l *textLog) cutSegs(n int) {
	if n < len(l.segs) {
		l.entries = l.entries[:l.segs[n].entry]
		l.segs = l.segs[:n]
	}
}

// dropFrom takes back segment n and every one after it: text and entries.
func (l *textLog) dropFrom(n int) Drop {
	if n >= len(l.segs) {
		return Drop{}
	}
	cut := l.segs[n].start
	d := Drop{Bytes: len(l.text) - cut, Chars: utf8.RuneCount(l.text[cut:]), Entries: len(l.entries) - l.segs[n].entry}
	l.cutSegs(n)
	l.text = l.text[:cut]
	l.chars -= d.Chars
	return d
}

// segAt is the index of the segment starting at off, or -1.
func (l *textLog) segAt(off int) int {
	for i := len(l.segs) - 1; i >= 0; i-- {
		if l.segs[i].start == off {
			return i
		}
		if l.segs[i].start < off {
			break
		}
	}
	return -1
}

// textTracker is what a JobStream knows about its job's text: the text as the
// latest attempt has built it (job, following rewinds), and the text its
// caller has been given (given). Events are rewritten so that the caller's
// text only ever grows by what is new to it: a prefix an attempt regenerates
// is swallowed, and only where the texts really differ is a Drop handed over.
type textTracker struct {
	job   textLog
	given textLog
	seen  int // job segments already handed over or swallowed
}

// token takes a token event of the job (rewind: it starts at off, below the
// text held) and rewrites its Delta, Logprobs and Offset as the caller should
// apply them, after the returned Drop.
func (t *textTracker) token(tok *schemas.TokenEventMsg, rewind bool, off int) (Drop, int) {
	if rewind {
		t.job.truncate(off)
		t.seen = min(t.seen, len(t.job.segs))
	}
	t.job.add(tok.Delta, tok.Logprobs)
	g, j := t.given.text, t.job.text
	var drop Drop
	from := len(g)
	switch {
	case len(j) >= len(g) && string(j[:len(g)]) == string(g):
		// The caller's text continues: hand over what is new, with the entries of
		// the deltas that reach into it (a delta that completes a regenerated
		// prefix brings all of its entries).
	case len(j) < len(g) && string(g[:len(j)]) == string(j):
		// An attempt that started over regenerates text the caller has: nothing to
		// hand over, and its entries are those the caller holds already.
		t.seen = len(t.job.segs)
		tok.Delta, tok.Logprobs, tok.Offset = "", nil, len(g)
		return Drop{}, t.given.chars
	default:
		// The texts differ: take back the caller's deltas from the last point
		// where both texts start a delta and agree, and hand the job's text over
		// from there with every entry of it.
		from = t.cutPoint()
		drop = t.given.dropFrom(t.given.segAt(from))
		t.seen = t.job.segAt(from)
	}
	var lps []schemas.TokenLogprob
	for i := t.seen; i < len(t.job.segs); i++ {
		if t.job.end(i) > from || t.job.segs[i].start >= from {
			lps = append(lps, t.job.entries[t.job.segs[i].entry:entryEnd(&t.job, i)]...)
		}
	}
	t.seen = len(t.job.segs)
	tok.Offset, tok.Delta, tok.Logprobs = from, string(j[from:]), lps
	chars := t.given.chars
	t.given.add(tok.Delta, lps)
	return drop, chars
}

func entryEnd(l *textLog, i int) int {
	if i+1 < len(l.segs) {
		return l.segs[i+1].entry
	}
	return len(l.entries)
}

// cutPoint is the greatest offset at which both the given and the job's text
// start a delta and up to which they agree; 0 at worst (both start there).
func (t *textTracker) cutPoint() int {
	c := common(t.given.text, t.job.text)
	gi, ji := len(t.given.segs)-1, len(t.job.segs)-1
	for gi > 0 && ji > 0 {
		gs, js := t.given.segs[gi].start, t.job.segs[ji].start
		switch {
		case gs > c || gs > js:
			gi--
		case js > c || js > gs:
			ji--
		default:
			return gs
		}
	}
	return 0
}

// result reconciles the caller's text with the terminal record's: it returns
// what to drop, the rest of the record's text to append and where that starts
// in characters.
func (t *textTracker) result(text string) (Drop, string, int) {
	g := t.given.text
	var drop Drop
	from := len(g)
	if len(text) < len(g) || text[:len(g)] != string(g) {
		c := common(g, []byte(text))
		n := len(t.given.segs)
		for n > 0 && t.given.segs[n-1].start > c {
			n--
		}
		if n > 0 && t.given.end(n-1) > c {
			n-- // the delta the texts differ in goes whole
		}
		drop = t.given.dropFrom(n)
		from = len(t.given.text)
	}
	rest, chars := text[from:], t.given.chars
	t.given.add(rest, nil)
	return drop, rest, chars
}

// common is the length of the longest common prefix of a and b. It may end
// inside a character; the cut made from it goes back to where a delta starts,
// and deltas are whole characters.
func common(a, b []byte) int {
	n := 0
	for n < len(a) && n < len(b) && a[n] == b[n] {
		n++
	}
	return n
}
