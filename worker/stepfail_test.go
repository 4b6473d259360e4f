package worker

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// A generate the runtime fails batch_failed (a decode step it shared with
// other rows raised) is reported for retry, resuming from the two tokens the
// caller was sent, and ends in no record here; one failed generation_failed
// (a row alone in the step) is a failed record and no report.
//
// Mutation caught: batch_failed "retryable": false in codes/errors.json (the
// job fails for good with the batch, as every row did before): red.
func TestFailedStepIsRetriedOnlyWhenShared(t *testing.T) {
	for _, tc := range []struct {
		code  string
		retry bool
	}{{schemas.CodeBatchFailed, true}, {schemas.CodeGenerationFailed, false}} {
		t.Run(tc.code, func(t *testing.T) {
			b := startBus(t, 0)
			cfg := fakeConfig(t, b, "w-step-"+tc.code[:5], 0)
			cfg.RuntimeEnv = append(cfg.RuntimeEnv, "FAKE_FAIL_FIRST="+tc.code)
			a := startAgent(t, cfg, true)
			reports := attemptReports(t, b.nc, a.ID())
			ctx := within(t, 30*time.Second)

			j := newJob("shares a step", 8)
			c := collect(t, b.nc, j.ReplyTo)
			if rep := assign(t, b.nc, a.ID(), batch("tiny", j)); rep.Status != schemas.AssignAccepted {
				t.Fatalf("%+v", rep)
			}
			if !tc.retry {
				r := c.untilResult(ctx)
				if r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != tc.code {
					t.Fatalf("result %s (%+v), want failed %s", r.Status, r.Error, tc.code)
				}
				return
			}
			select {
			case m := <-reports:
				var r schemas.AttemptReportMsg
				if err := json.Unmarshal(m.Data, &r); err != nil {
					t.Fatal(err)
				}
				if r.Error.Code != tc.code || !r.Error.Retryable || r.Text != "t0 t1 " || r.Attempt != 1 {
					t.Fatalf("report %+v, want %s retryable at attempt 1 resuming from %q", r, tc.code, "t0 t1 ")
				}
			case <-ctx.Done():
				t.Fatal("no attempt report")
			}
		})
	}
}
