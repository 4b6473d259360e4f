package worker

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A terminal record that fails its own schema — here a runtime error message
// longer than the schema's bound, which the worker passes on — is not dropped
// (that left the job running on its dispatcher for ever) but replaced by a
// valid attempt report of the same attempt, with what the caller has, so the
// dispatcher retries or ends the job; the record is never handed over. (A
// text over the schema's bound no longer gets here: fitRecord ends such a job
// failed result_too_large, TestFitRecord.)
// Mutation caught: finish returning on an invalid record without
// reportAttempt (no report arrives).
func TestInvalidOwnRecordEndsInAttemptReport(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	cfg := testConfig(t, b, "w-invalid")
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.nc, a.mark = b.nc, b.nc.NewInbox() // what Start sets; this test needs no runtime
	a.handOver = func(context.Context, string, []byte) ([]byte, error) {
		t.Error("an invalid record was handed over")
		return nil, context.Canceled
	}
	reports, err := b.nc.SubscribeSync(subjects.Attempt(cfg.WorkerID))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	longMessage := &schemas.ErrorInfo{Code: schemas.CodeGenerationFailed, Message: strings.Repeat("é", 5000)}
	for _, tc := range []struct {
		name     string
		text     string
		wantText string
		wantSeq  int
	}{
		{"long error message", "so far", "so far", 7},
	} {
		res := &schemas.ResultMsg{
			Type: "result", JobID: "job-invalid", Tenant: "acme", Attempt: 3, Seq: 7, Status: schemas.StatusFailed,
			Text: tc.text, Usage: schemas.Usage{CompletionTokens: 9, TotalTokens: 9}, Error: longMessage,
			Model: "tiny", WorkerID: cfg.WorkerID, FinishedAt: now,
		}
		a.finish(t.Context(), res, testDispatcher, "")
		m, err := reports.NextMsg(10 * time.Second)
		if err != nil {
			t.Fatalf("%s: no attempt report: %v", tc.name, err)
		}
		if err := schemas.Validate(schemas.AttemptReport, m.Data); err != nil {
			t.Fatalf("%s: report fails its schema: %v", tc.name, err)
		}
		var rep schemas.AttemptReportMsg
		if err := json.Unmarshal(m.Data, &rep); err != nil {
			t.Fatal(err)
		}
		if rep.JobID != res.JobID || rep.Tenant != "acme" || rep.Attempt != 3 || rep.WorkerID != cfg.WorkerID ||
			rep.Error.Code != schemas.CodeInvalidMessage || rep.Text != tc.wantText || rep.Seq != tc.wantSeq {
			t.Fatalf("%s: report %+v", tc.name, rep)
		}
	}
}
