package worker

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// fitRecord leaves a record that fits alone, and replaces one that does not
// with the failed result_too_large record whose text is the longest prefix
// that fits — whole runes, one more would not fit — valid to its schema.
// Mutations caught: fitRecord's size check removed (the first oversized
// case is not cut), and 100 bytes less room for the text (one more rune
// would still fit: not the longest prefix).
func TestFitRecord(t *testing.T) {
	t.Parallel()
	now := time.Now().UTC()
	lps := []schemas.TokenLogprob{{Token: "}<>", Logprob: -0.5}}
	mk := func(status, text string) *schemas.ResultMsg {
		r := &schemas.ResultMsg{
			Type: "result", JobID: "job-fit", Tenant: "acme", Attempt: 1, Seq: 40, Status: status, Text: text,
			Usage: schemas.Usage{PromptTokens: 3, CompletionTokens: 900, TotalTokens: 903}, Model: "tiny",
			WorkerID: "w-fit", FinishedAt: now, Logprobs: lps,
		}
		switch status {
		case schemas.StatusCompleted:
			r.FinishReason = schemas.FinishLength
		case schemas.StatusCancelled:
			r.FinishReason = schemas.FinishCancelled
			r.Error = &schemas.ErrorInfo{Code: schemas.CodeCancelled, Message: "cancelled on request"}
		}
		return r
	}
	const budget = smallPayload - recordHeadroom

	small := mk(schemas.StatusCompleted, "short")
	if got, _, cut, err := fitRecord(small, budget); err != nil || cut || got != small {
		t.Fatalf("a record that fits was changed: cut %v err %v", cut, err)
	}

	for _, tc := range []struct {
		name, status, text string
		budget             int
	}{
		{"escaped", schemas.StatusCompleted, strings.Repeat("}<>", 5000), budget},
		{"multibyte", schemas.StatusCancelled, strings.Repeat("é\n€😀a", 3000), budget},
		{"invalid utf-8", schemas.StatusCompleted, strings.Repeat("ab\xffc", 8000), budget},
		{"over the schema's characters", schemas.StatusCompleted, strings.Repeat("x", maxRecordText+10), 4 << 20},
	} {
		orig := mk(tc.status, tc.text)
		got, data, cut, err := fitRecord(orig, tc.budget)
		if err != nil || !cut {
			t.Fatalf("%s: cut %v err %v", tc.name, cut, err)
		}
		if err := schemas.Validate(schemas.Result, data); err != nil {
			t.Fatalf("%s: cut record fails its schema: %v", tc.name, err)
		}
		if len(data) > tc.budget {
			t.Fatalf("%s: %d bytes over budget %d", tc.name, len(data), tc.budget)
		}
		if got.Status != schemas.StatusFailed || got.Error.Code != schemas.CodeResultTooLarge || got.Logprobs != nil ||
			!got.LogprobsTruncated || got.Usage != orig.Usage || got.Seq != orig.Seq || got.FinishReason != orig.FinishReason {
			t.Fatalf("%s: cut record %+v", tc.name, got)
		}
		if got.Text == "" || !strings.HasPrefix(orig.Text, got.Text) || !utf8.ValidString(strings.ToValidUTF8(got.Text, "")) {
			t.Fatalf("%s: kept %d bytes, not a prefix", tc.name, len(got.Text))
		}
		if _, w := utf8.DecodeRuneInString(orig.Text[len(got.Text):]); w > 0 && len(got.Text) < len(orig.Text) {
			if utf8.RuneCountInString(got.Text) < maxRecordText {
				one := *got
				one.Text = orig.Text[:len(got.Text)+w]
				if b, _ := json.Marshal(&one); len(b) <= tc.budget {
					t.Fatalf("%s: one more rune (%d bytes) would still fit: not the longest prefix", tc.name, len(b))
				}
			}
		}
		if orig.Status != tc.status || orig.Text != tc.text {
			t.Fatalf("%s: the original record was modified", tc.name)
		}
	}
}

// boundReport sends a report that fits as is, and one whose text passes the
// max payload without text and tokens (a resume must be exactly what the
// caller had: no cut). Mutation caught: reportFits without its size check.
func TestBoundReport(t *testing.T) {
	t.Parallel()
	mk := func(text string) *schemas.AttemptReportMsg {
		return &schemas.AttemptReportMsg{
			JobID: "job-rep", Attempt: 1, WorkerID: "w-rep", Error: schemas.ErrorInfo{Code: schemas.CodeRuntimeCrashed, Message: "x", Retryable: true},
			Text: text, Seq: 12, CompletionTokens: 30, ReportedAt: time.Now().UTC(),
		}
	}
	rep := mk("fits")
	if data, ok := boundReport(rep, smallPayload); !ok || rep.Text != "fits" || rep.CompletionTokens != 30 || len(data) > smallPayload {
		t.Fatalf("a fitting report changed: %+v", rep)
	}
	rep = mk(strings.Repeat("}<>", 2000)) // 26 KB escaped
	data, ok := boundReport(rep, smallPayload)
	if !ok || len(data) > smallPayload || rep.Text != "" || rep.CompletionTokens != 0 || rep.Seq != 12 {
		t.Fatalf("oversized report: ok %v, %d bytes, %+v", ok, len(data), rep)
	}
	if err := schemas.Validate(schemas.AttemptReport, data); err != nil {
		t.Fatal(err)
	}
}
