package bus

import (
	"testing"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// A retry's first event resumes at the dispatcher's offset with seq 0; when
// the caller lost the previous attempt's last events, that offset is past the
// caller's text, and the event says so (red team round 21: it came with
// Missed 0 and an offset that looked seamless).
//
// Mutation caught: accept without the offset check: missed 0: red.
func TestResumePastTheCallersTextIsMissed(t *testing.T) {
	t.Parallel()
	s := &JobStream{jobID: "j"}
	if _, ok := s.accept([]byte(tokenLine(1, 0, 0, "Hello "))); !ok {
		t.Fatal("first event refused")
	}
	// tokenLine(1, 1, 6, "big ") is lost; attempt 2 resumes at byte 10.
	ev, ok := s.accept([]byte(tokenLine(2, 0, 10, "world")))
	if !ok || ev.Missed == 0 || !ev.Restarted {
		t.Fatalf("resumed event ok=%v missed=%d restarted=%v, want missed > 0 on a restart", ok, ev.Missed, ev.Restarted)
	}
	// A resume exactly where the caller's text ends is whole.
	s = &JobStream{jobID: "j"}
	s.accept([]byte(tokenLine(1, 0, 0, "Hello ")))
	if ev, _ := s.accept([]byte(tokenLine(2, 0, 6, "world"))); ev.Missed != 0 {
		t.Fatalf("a seamless resume reported %d missed", ev.Missed)
	}
}

// A gap before a terminal seen on the reply subject is counted once: the
// terminal handed over (after its record is read) counts it.
//
// Mutation caught: accept's result case adding to s.missed again: 6: red.
func TestTerminalGapCountedOnce(t *testing.T) {
	t.Parallel()
	s := &JobStream{jobID: "j"}
	s.accept([]byte(tokenLine(1, 0, 0, "a")))
	// seq 1..3 lost; the result event says seq 4.
	if _, ok := s.accept([]byte(`{"type":"result","job_id":"j","attempt":1,"seq":4,"status":"completed","text":"abcd"}`)); !ok {
		t.Fatal("result event refused")
	}
	ev := s.terminal(&schemas.ResultMsg{Type: "result", JobID: "j", Attempt: 1, Seq: 4, Status: schemas.StatusCompleted, Text: "abcd"})
	if ev.Missed != 3 || s.Missed() != 3 {
		t.Fatalf("terminal missed %d, stream Missed() %d; want 3 and 3", ev.Missed, s.Missed())
	}
}
