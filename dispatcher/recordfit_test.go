package dispatcher

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A record the dispatcher writes itself fits the server's max payload whatever
// the worker's last error said: on a 16 KiB server, a job whose every attempt
// failed with a message of '<' (six bytes each in JSON) as long as a report
// can carry ends with one attempts_exhausted record, its message cut, and is
// acked. Before, the record was refused as too large and the delivery naked;
// the job ended only after its redeliveries ran out, "delivered 3 times",
// the worker's error lost (a gap the reliability notes admitted below 36 KiB;
// with a message that also fails the redelivered record, never).
//
// Mutation caught: fitOwnRecord's call in finishWrite removed (the record says
// "last error redelivered: delivered 3 times").
func TestOwnRecordFitsSmallMaxPayload(t *testing.T) {
	t.Parallel()
	const maxPayload = 16 << 10
	e := newEnvWith(t, natsserver.Options{MaxPayload: maxPayload}, jsprov.Options{})
	// The longest message of '<' (six bytes each in JSON) whose attempt report
	// still fits the max payload (the worker must be heard); the dispatcher's
	// record wraps it ("gave up after 2 attempts; last error …") and does not.
	long := ""
	for n := 1; ; n++ {
		rep := schemas.AttemptReportMsg{JobID: "fit-own", Tenant: "", Attempt: 2, WorkerID: "w1",
			Error: schemas.ErrorInfo{Code: "runtime_crashed", Message: strings.Repeat("<", n), Retryable: true},
			Text:  "t0 ", Seq: 1, CompletionTokens: 1, ReportedAt: time.Now().UTC()}
		data, _ := json.Marshal(rep)
		if len(data) > maxPayload-64 {
			break
		}
		long = rep.Error.Message
	}
	e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Crash: 1, CrashMessage: long} })
	cfg := testConfig("d1", e.connect("d1"))
	cfg.MaxAttempts = 2
	runDispatcher(t, cfg)
	j := newJob("fit-own", "m", "normal")
	r := e.waitResultAfter(j, 30*time.Second)
	if r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != schemas.CodeAttemptsExhausted {
		t.Fatalf("terminal %+v (error %+v), want failed attempts_exhausted", r, r.Error)
	}
	want := "gave up after 2 attempts; last error runtime_crashed: <<<"
	if !strings.HasPrefix(r.Error.Message, want) || len(r.Error.Message) >= len(want)+len(long)-3 {
		t.Fatalf("message %q…(%d bytes), want a cut %q…", r.Error.Message[:min(80, len(r.Error.Message))], len(r.Error.Message), want)
	}
	if r.Text != "t0 t1 " { // the second attempt resumed after the first's token
		t.Fatalf("text %q, want what the caller received (t0 t1 )", r.Text)
	}
	waitFor(t, 10*time.Second, "the job acked", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })
	if n := e.streamMsgs(subjects.StreamResults); n != 1 {
		t.Fatalf("RESULTS holds %d records, want 1", n)
	}
}

// fitOwnRecord cuts the error message first, then the text, to the byte, and
// leaves a record that fits alone.
func TestFitOwnRecord(t *testing.T) {
	rec := func(msg, text string) *schemas.ResultMsg {
		return &schemas.ResultMsg{Type: "result", JobID: "j", Attempt: 1, Status: schemas.StatusFailed, Text: text,
			Error: &schemas.ErrorInfo{Code: schemas.CodeAttemptsExhausted, Message: msg}, FinishedAt: time.Unix(0, 0).UTC()}
	}
	size := func(r *schemas.ResultMsg) int { d, _ := json.Marshal(r); return len(d) }
	for _, tc := range []struct {
		name            string
		msg, text       string
		budget          int
		wantMsg, wantTx int // kept bytes; -1: all
	}{
		{"fits", "boom", "abc", 1 << 10, -1, -1},
		{"message cut", strings.Repeat("<", 1000), "abc", 2000, 0, -1},
		{"message gone, text cut", strings.Repeat("<", 100), strings.Repeat("é", 500), 500, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := rec(tc.msg, tc.text)
			fitOwnRecord(r, tc.budget)
			if got := size(r); got > tc.budget {
				t.Fatalf("encoded %d bytes, budget %d", got, tc.budget)
			}
			if !strings.HasPrefix(tc.msg, r.Error.Message) || !strings.HasPrefix(tc.text, r.Text) {
				t.Fatalf("kept %q / %q: not prefixes", r.Error.Message, r.Text)
			}
			if tc.wantMsg < 0 && r.Error.Message != tc.msg || tc.wantTx < 0 && r.Text != tc.text {
				t.Fatalf("cut what fitted: %q / %q", r.Error.Message, r.Text)
			}
			// To the byte: one more rune of what was cut would not fit.
			if tc.wantMsg >= 0 && len(r.Error.Message) < len(tc.msg) && r.Text == tc.text {
				r2 := rec(tc.msg[:len(r.Error.Message)+1], tc.text)
				if size(r2) <= tc.budget {
					t.Fatalf("message cut to %d bytes, %d fit", len(r.Error.Message), len(r.Error.Message)+1)
				}
			}
		})
	}
}
