package tests

import (
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// The red team's F4 through the real stack — producer, dispatcher, worker,
// runtime — on a server with a 16 KiB max payload: a job whose text (token
// 439 of the tiny model, "}<>", 13 bytes in JSON, 1900 times) makes a record
// over the payload ends at its first attempt with one stored record, failed
// result_too_large, its text a prefix of what was streamed, and its JOBS
// message acked. Before, the worker's hand-over failed for good and the job
// stayed running until attempt_timeout, then ran again to the same end.
// Mutation caught: worker fitRecord's size check removed (each attempt's
// hand-over fails, is reported handover_failed, and the job ends
// attempts_exhausted, or not within the limit).
func TestRecordTooLargeForTheBusEndsOnce(t *testing.T) {
	const maxPayload = 16 << 10
	s := newStackWith(t, natsserver.Options{MaxPayload: maxPayload})
	s.startDispatcher("d1")
	s.startWorker(1)
	ctx := testenv.Context(t, 90*time.Second)

	j := tinyJob("x", 1900)
	j.LogitBias = map[string]float64{"439": 100}
	o, err := s.submit(ctx, j, nil) // o.text: every delta streamed
	if err != nil {
		t.Fatal(err)
	}
	r := o.result
	if r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != schemas.CodeResultTooLarge || r.Attempt != 1 {
		t.Fatalf("result %s attempt %d %+v", r.Status, r.Attempt, r.Error)
	}
	if r.Text == "" || len(r.Text) >= len(o.text) || !strings.HasPrefix(o.text, r.Text) {
		t.Fatalf("record keeps %d bytes of the %d streamed; want a non-empty proper prefix", len(r.Text), len(o.text))
	}
	if r.Usage.CompletionTokens != 1900 {
		t.Fatalf("usage %+v", r.Usage)
	}
	raw, err := results.Stored(ctx, s.bus.JS, r.Tenant, r.JobID)
	if err != nil {
		t.Fatal(err)
	}
	if len(raw) > maxPayload {
		t.Fatalf("stored record of %d bytes", len(raw))
	}
	if n := s.bus.StreamMsgs(t, subjects.StreamResults); n != 1 {
		t.Fatalf("RESULTS holds %d records", n)
	}
	waitFor(t, 30*time.Second, func() bool { return s.bus.StreamMsgs(t, subjects.StreamJobs) == 0 })
}
