package bus

import (
	"fmt"
	"strings"
	"testing"
)

// apply plays events into a caller's text the way JobStream's users must.
func apply(t *testing.T, s *JobStream, text *strings.Builder, line string) Event {
	t.Helper()
	ev, ok := s.accept([]byte(line))
	if !ok {
		t.Fatalf("event not accepted: %s", line)
	}
	if ev.Rewind {
		kept := text.String()[:ev.Offset]
		text.Reset()
		text.WriteString(kept)
	}
	if ev.Token != nil {
		text.WriteString(ev.Token.Delta)
	}
	return ev
}

func tokenLine(attempt, seq, offset int, delta string) string {
	return fmt.Sprintf(`{"type":"token","job_id":"j","attempt":%d,"seq":%d,"delta":%q,"tokens":%d,"offset":%d}`, attempt, seq, delta, seq+1, offset)
}

// A resumed attempt continues the text; one that had to start over (its
// dispatcher died with the resume state) rewinds it, so the caller's text is
// never a concatenation of two attempts' beginnings.
// Mutation caught: JobStream.accept not setting Rewind for an attempt whose
// offset is below the text held (`if tok.Offset < s.textLen`).
func TestJobStreamResumeAndRewind(t *testing.T) {
	t.Parallel()
	s := &JobStream{jobID: "j"}
	var text strings.Builder
	apply(t, s, &text, tokenLine(1, 0, 0, "Once "))
	apply(t, s, &text, tokenLine(1, 1, 5, "upon "))

	ev := apply(t, s, &text, tokenLine(2, 0, 10, "a time"))
	if !ev.Restarted || ev.Rewind {
		t.Fatalf("resumed attempt: %+v", ev)
	}
	if text.String() != "Once upon a time" {
		t.Fatalf("text %q", text.String())
	}

	ev = apply(t, s, &text, tokenLine(3, 0, 0, "Once "))
	if !ev.Restarted || !ev.Rewind || ev.Offset != 0 {
		t.Fatalf("attempt from scratch must rewind: %+v", ev)
	}
	apply(t, s, &text, tokenLine(3, 1, 5, "more"))
	if text.String() != "Once more" {
		t.Fatalf("text after rewind %q", text.String())
	}
}

func TestJobStreamDropsOffsetOutOfRange(t *testing.T) {
	t.Parallel()
	s := &JobStream{jobID: "j"}
	for _, off := range []int{-1, maxOffset + 1} {
		if _, ok := s.accept([]byte(tokenLine(1, 0, off, "x"))); ok {
			t.Fatalf("offset %d accepted", off)
		}
	}
}
