package bus

import (
	"context"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// step is one token event as a worker sends it, and what the caller must get.
type step struct {
	attempt, seq, offset int
	delta                string
	lps                  []string // tokens of its logprob entries
	// what the caller is handed
	want     string
	wantLps  []string
	wantDrop Drop
}

// caller is a consumer that applies events the one documented way: take back
// Drop, then append.
type caller struct {
	text    string
	entries []string
}

func (c *caller) apply(d Drop, text string, lps []schemas.TokenLogprob) {
	c.text = c.text[:len(c.text)-d.Bytes] + text
	c.entries = c.entries[:len(c.entries)-d.Entries]
	for _, e := range lps {
		c.entries = append(c.entries, e.Token)
	}
}

func entryTokens(lps []schemas.TokenLogprob) []string {
	var out []string
	for _, e := range lps {
		out = append(out, e.Token)
	}
	return out
}

// TestJobStreamTracksCallersText: whatever a retry does (resume where the
// caller's text stopped, resume with an overlap, start over and regenerate the
// same text, start over and generate another), a caller that takes back Drop
// and appends deltas holds the job's text, with the entries that came with it.
// Mutations caught: textTracker.token handing over the whole delta when the
// caller's text continues (`string(j[from:])` → tok.Delta: "Once upon Once
// upon a time"); the regenerating case not swallowing (`return Drop{}` removed
// from it: a divergence Drop where none is due); result not taking back
// (`drop = ...dropFrom(n)` removed: "acbc").
func TestJobStreamTracksCallersText(t *testing.T) {
	t.Parallel()
	once := []step{
		{attempt: 1, seq: 0, offset: 0, delta: "Once ", lps: []string{"Once"}, want: "Once ", wantLps: []string{"Once"}},
		{attempt: 1, seq: 1, offset: 5, delta: "upon ", lps: []string{"upon"}, want: "upon ", wantLps: []string{"upon"}},
	}
	cases := []struct {
		name      string
		steps     []step
		result    string
		wantDrop  Drop // of the terminal
		wantRest  string
		wantText  string
		wantLps   []string
		wantChars int
	}{
		{name: "in order", steps: once, result: "Once upon ", wantText: "Once upon ", wantLps: []string{"Once", "upon"}},
		{name: "resume where the caller stopped", steps: append(once[:2:2],
			step{attempt: 2, seq: 2, offset: 10, delta: "a time", lps: []string{"a", "time"}, want: "a time", wantLps: []string{"a", "time"}}),
			result: "Once upon a time", wantText: "Once upon a time", wantLps: []string{"Once", "upon", "a", "time"}},
		{name: "resume with overlap", steps: append(once[:2:2],
			step{attempt: 2, seq: 0, offset: 5, delta: "upon ", lps: []string{"upon2"}},
			step{attempt: 2, seq: 1, offset: 10, delta: "a time", lps: []string{"a", "time"}, want: "a time", wantLps: []string{"a", "time"}}),
			result: "Once upon a time", wantText: "Once upon a time", wantLps: []string{"Once", "upon", "a", "time"}},
		{name: "restart regenerates the same text", steps: append(once[:2:2],
			step{attempt: 2, seq: 0, offset: 0, delta: "Once ", lps: []string{"Once2"}},
			step{attempt: 2, seq: 1, offset: 5, delta: "up", lps: []string{"up2"}},
			step{attempt: 2, seq: 2, offset: 7, delta: "on a ", lps: []string{"on2", "a"}, want: "a ", wantLps: []string{"on2", "a"}},
			step{attempt: 2, seq: 3, offset: 12, delta: "time", lps: []string{"time"}, want: "time", wantLps: []string{"time"}}),
			result: "Once upon a time", wantText: "Once upon a time", wantLps: []string{"Once", "upon", "on2", "a", "time"}},
		{name: "restart from scratch diverges", steps: append(once[:2:2],
			step{attempt: 2, seq: 0, offset: 0, delta: "Long ", lps: []string{"Long"}, want: "Long ", wantLps: []string{"Long"},
				wantDrop: Drop{Bytes: 10, Chars: 10, Entries: 2}},
			step{attempt: 2, seq: 1, offset: 5, delta: "ago", lps: []string{"ago"}, want: "ago", wantLps: []string{"ago"}}),
			result: "Long ago", wantText: "Long ago", wantLps: []string{"Long", "ago"}},
		{name: "restart diverges after a shared prefix", steps: append(once[:2:2],
			step{attempt: 1, seq: 2, offset: 10, delta: "a ", lps: []string{"a"}, want: "a ", wantLps: []string{"a"}},
			step{attempt: 2, seq: 0, offset: 0, delta: "Once ", lps: []string{"Once2"}},
			step{attempt: 2, seq: 1, offset: 5, delta: "upon ", lps: []string{"upon2"}},
			step{attempt: 2, seq: 2, offset: 10, delta: "the ", lps: []string{"the"}, want: "the ", wantLps: []string{"the"},
				wantDrop: Drop{Bytes: 2, Chars: 2, Entries: 1}}),
			result: "Once upon the ", wantText: "Once upon the ", wantLps: []string{"Once", "upon", "the"}},
		{name: "divergence inside a delta takes the whole delta back", steps: []step{
			{attempt: 1, seq: 0, offset: 0, delta: "Once upon ", lps: []string{"Once", "upon"}, want: "Once upon ", wantLps: []string{"Once", "upon"}},
			{attempt: 2, seq: 0, offset: 0, delta: "Once up", lps: []string{"Once2", "up"}},
			{attempt: 2, seq: 1, offset: 7, delta: "side", lps: []string{"side"}, want: "Once upside", wantLps: []string{"Once2", "up", "side"},
				wantDrop: Drop{Bytes: 10, Chars: 10, Entries: 2}}},
			result: "Once upside", wantText: "Once upside", wantLps: []string{"Once2", "up", "side"}},
		{name: "divergence inside a character", steps: []step{
			{attempt: 1, seq: 0, offset: 0, delta: "hé", lps: []string{"h", "é"}, want: "hé", wantLps: []string{"h", "é"}},
			{attempt: 2, seq: 0, offset: 0, delta: "h", lps: []string{"h2"}},
			{attempt: 2, seq: 1, offset: 1, delta: "è", lps: []string{"è"}, want: "hè", wantLps: []string{"h2", "è"},
				wantDrop: Drop{Bytes: 3, Chars: 2, Entries: 2}}},
			result: "hè", wantText: "hè", wantLps: []string{"h2", "è"}},
		{name: "lost last event: the record's rest", steps: once[:1], result: "Once upon ", wantRest: "upon ",
			wantText: "Once upon ", wantLps: []string{"Once"}},
		{name: "lost middle event: the record's text from there", steps: []step{
			{attempt: 1, seq: 0, offset: 0, delta: "a", lps: []string{"a"}, want: "a", wantLps: []string{"a"}},
			{attempt: 1, seq: 2, offset: 2, delta: "c", lps: []string{"c"}, want: "c", wantLps: []string{"c"}}},
			result: "abc", wantDrop: Drop{Bytes: 1, Chars: 1, Entries: 1}, wantRest: "bc", wantText: "abc", wantLps: []string{"a"}},
		{name: "restart ends inside the caller's text", steps: append(once[:2:2],
			step{attempt: 2, seq: 0, offset: 0, delta: "Once ", lps: []string{"Once2"}}),
			result: "Once ", wantDrop: Drop{Bytes: 5, Chars: 5, Entries: 1}, wantText: "Once ", wantLps: []string{"Once"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := &JobStream{jobID: "j"}
			var c caller
			for i, st := range tc.steps {
				tok := schemas.TokenEventMsg{Type: "token", JobID: "j", Attempt: st.attempt, Seq: st.seq, Offset: st.offset, Delta: st.delta, Tokens: st.seq + 1}
				for _, l := range st.lps {
					tok.Logprobs = append(tok.Logprobs, schemas.TokenLogprob{Token: l})
				}
				data, _ := json.Marshal(tok)
				ev, ok := s.accept(data)
				if !ok {
					t.Fatalf("step %d not accepted", i)
				}
				got := ev.Token
				if got.Delta != st.want || !reflect.DeepEqual(entryTokens(got.Logprobs), st.wantLps) || ev.Drop != st.wantDrop {
					t.Fatalf("step %d: delta %q entries %q drop %+v, want %q %q %+v", i, got.Delta, entryTokens(got.Logprobs), ev.Drop, st.want, st.wantLps, st.wantDrop)
				}
				if kept := c.text[:len(c.text)-ev.Drop.Bytes]; got.Offset != len(kept) || ev.CharOffset != utf8.RuneCountInString(kept) {
					t.Fatalf("step %d: offset %d (%d chars), caller keeps %q", i, got.Offset, ev.CharOffset, kept)
				}
				c.apply(ev.Drop, got.Delta, got.Logprobs)
				if c.text != s.Text() || !reflect.DeepEqual(c.entries, entryTokens(s.Logprobs())) {
					t.Fatalf("step %d: caller %q %q, stream %q %q", i, c.text, c.entries, s.Text(), entryTokens(s.Logprobs()))
				}
			}
			ev := s.terminal(&schemas.ResultMsg{Type: "result", JobID: "j", Attempt: 1, Status: schemas.StatusCompleted, Text: tc.result})
			if ev.Drop != tc.wantDrop || ev.Rest != tc.wantRest || ev.CharOffset != utf8.RuneCountInString(c.text)-ev.Drop.Chars {
				t.Fatalf("terminal: drop %+v rest %q, want %+v %q", ev.Drop, ev.Rest, tc.wantDrop, tc.wantRest)
			}
			c.apply(ev.Drop, ev.Rest, nil)
			if c.text != tc.wantText || c.text != tc.result || s.Text() != tc.result || !reflect.DeepEqual(c.entries, tc.wantLps) {
				t.Fatalf("caller holds %q %q, want %q %q", c.text, c.entries, tc.wantText, tc.wantLps)
			}
			if !reflect.DeepEqual(entryTokens(s.Logprobs()), tc.wantLps) || s.text.given.chars != utf8.RuneCountInString(tc.result) {
				t.Fatalf("stream holds entries %q, %d chars", entryTokens(s.Logprobs()), s.text.given.chars)
			}
		})
	}
}

// A caller that ignores Drop (an HTTP stream cannot take text back) still
// sees each byte of a regenerated prefix once.
func TestJobStreamSwallowsRegeneratedPrefix(t *testing.T) {
	t.Parallel()
	s := &JobStream{jobID: "j"}
	var b strings.Builder
	for _, line := range []string{tokenLine(1, 0, 0, "Once "), tokenLine(1, 1, 5, "upon "),
		tokenLine(2, 0, 0, "Once "), tokenLine(2, 1, 5, "upon "), tokenLine(2, 2, 10, "a time")} {
		ev, ok := s.accept([]byte(line))
		if !ok || ev.Drop.Any() {
			t.Fatalf("%s: accepted %v, drop %+v", line, ok, ev.Drop)
		}
		b.WriteString(ev.Token.Delta)
	}
	if b.String() != "Once upon a time" {
		t.Fatalf("text %q", b.String())
	}
}

// Deltas still buffered when the caller's ctx ends are skipped on the way to
// the terminal, so they are not the caller's text: the terminal's Rest is.
// Mutation caught: lastLookup accepting every buffered event (Rest "", the
// caller holding "a" for "abc").
func TestJobStreamRestHasSkippedDeltas(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	ctx := ctxT(t)
	job := newJob("", "x")
	s, err := OpenStream(ctx, b.nc, b.js, job, StreamOptions{QuietAfter: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	pub := func(data []byte) {
		t.Helper()
		if err := b.nc.Publish(job.ReplyTo, data); err != nil {
			t.Fatal(err)
		}
	}
	tok := func(seq int, d string) []byte {
		data, _ := json.Marshal(schemas.TokenEventMsg{Type: "token", JobID: job.ID, Attempt: 1, Seq: seq, Delta: d, Tokens: seq + 1, Offset: seq})
		return data
	}
	pub(tok(0, "a"))
	if ev, err := s.Next(ctx); err != nil || ev.Token == nil || ev.Token.Delta != "a" {
		t.Fatalf("first event %+v %v", ev, err)
	}
	res := newResult(job.ID, 1, "w1", "abc")
	if err := results.Finish(ctx, b.js, res, ""); err != nil {
		t.Fatal(err)
	}
	pub(tok(1, "b"))
	pub(tok(2, "c"))
	data, _ := json.Marshal(res)
	pub(data)
	// The stream's own connection: after the round trip, all three are buffered.
	if err := b.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	ended, cancel := context.WithCancel(ctx)
	cancel()
	ev, err := s.Next(ended)
	if err != nil || !ev.Terminal() || ev.Rest != "bc" || ev.Drop.Any() || "a"+ev.Rest != ev.Result.Text || s.Text() != "abc" {
		t.Fatalf("terminal %+v rest %q drop %+v (%v), stream text %q", ev.Result, ev.Rest, ev.Drop, err, s.Text())
	}
}
