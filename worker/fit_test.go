package worker

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// smallPayload is the max payload of the tests' server: small enough that the
// tiny model outgrows it in a couple of thousand tokens.
const smallPayload = 16 << 10

// bigToken is a token of the tiny model that decodes to "}<>", 13 bytes in
// JSON (encoding/json escapes < and >): a logit bias of 100 makes the model
// produce nothing else (the red team's F4 reproduction).
const bigToken = "439"

// startSmallBus is startBus on a server whose max payload is smallPayload.
func startSmallBus(t testing.TB) *testBus {
	t.Helper()
	e := testenv.StartBusWith(t, testenv.BusOptions{
		Server:    natsserver.Options{MaxPayload: smallPayload},
		Provision: jsprov.Options{WorkerTTL: 10 * time.Second},
	})
	b := &testBus{srv: e.Server, nc: e.Conn, js: e.JS, kv: e.Workers}
	b.standInDispatcher(t)
	return b
}

func bigTokenJob(maxTokens int) schemas.JobRequest {
	j := newJob("x", maxTokens)
	j.LogitBias = map[string]float64{bigToken: 100}
	return j
}

// A job whose terminal record would pass the server's max payload ends with
// exactly one stored record that fits: failed, result_too_large, its text the
// longest prefix of what was streamed that fits, usage kept. Before, the
// hand-over failed ("maximum payload exceeded") and the job never ended.
// Mutation caught: fitRecord's size check removed (the record always passes
// as is): no record is stored and untilResult times out.
func TestE2EOversizedRecordEndsResultTooLarge(t *testing.T) {
	t.Parallel()
	b := startSmallBus(t)
	a := startAgent(t, realConfig(t, b, "w-bigrec"), true)
	ctx := within(t, 60*time.Second)

	j := bigTokenJob(1900)
	c := collect(t, b.nc, j.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", j)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	res := c.untilResult(ctx)
	var streamed strings.Builder
	for i, tok := range c.tokens { // not checkStream: the text is meant to be short of the deltas
		if tok.Seq != i || tok.Offset != streamed.Len() {
			t.Fatalf("token %d: seq %d offset %d after %d bytes", i, tok.Seq, tok.Offset, streamed.Len())
		}
		streamed.WriteString(tok.Delta)
	}
	if res.Status != schemas.StatusFailed || res.Error == nil || res.Error.Code != schemas.CodeResultTooLarge || res.Error.Retryable {
		t.Fatalf("result %s %+v", res.Status, res.Error)
	}
	if res.Text == "" || len(res.Text) >= streamed.Len() || !strings.HasPrefix(streamed.String(), res.Text) || !utf8.ValidString(res.Text) {
		t.Fatalf("kept %d bytes of %d streamed; want a non-empty proper prefix", len(res.Text), streamed.Len())
	}
	if res.Usage.CompletionTokens != 1900 || res.FinishReason != schemas.FinishLength || res.Seq != len(c.tokens) {
		t.Fatalf("usage %+v finish %q seq %d of %d events", res.Usage, res.FinishReason, res.Seq, len(c.tokens))
	}
	raw, err := results.Stored(ctx, b.js, "", j.ID)
	if err != nil {
		t.Fatal(err)
	}
	if len(raw) > smallPayload-recordHeadroom {
		t.Fatalf("stored record takes %d bytes, over its budget %d", len(raw), smallPayload-recordHeadroom)
	}
	if stored := fetchResult(t, b.js, j.ID); stored.Text != res.Text || stored.Error.Code != schemas.CodeResultTooLarge {
		t.Fatalf("stored record differs from the terminal event: %+v", stored.Error)
	}
	if n := resultsCount(t, b.js, j.ID); n != 1 {
		t.Fatalf("%d records stored", n)
	}
}

// An attempt report whose text passes the max payload (the runtime dies
// after more than 16 KiB of escaped text went out) still reaches the
// dispatcher: valid, within the payload, without text, so the retry starts
// over. Before, its publish failed and the job ran on until attempt_timeout.
// Mutation caught: reportFits without its size check: the publish fails
// (maximum payload exceeded) and no report arrives.
func TestE2EOversizedAttemptReportArrivesBounded(t *testing.T) {
	t.Parallel()
	b := startSmallBus(t)
	a := startAgent(t, realConfig(t, b, "w-bigrep"), true)
	ctx := within(t, 60*time.Second)

	j := bigTokenJob(4000)
	c := collect(t, b.nc, j.ReplyTo)
	reports := attemptReports(t, b.nc, a.ID())
	pid := a.RuntimePID()
	if rep := assign(t, b.nc, a.ID(), batch("tiny", j)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	// 1500 tokens of "}<>" escape to 19.5 KB: the report's text alone is over
	// the payload.
	for {
		tok, res := c.next(ctx)
		if res != nil {
			t.Fatal("the job ended before the runtime was killed")
		}
		if tok.Tokens >= 1500 {
			break
		}
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-reports:
		if err := schemas.Validate(schemas.AttemptReport, m.Data); err != nil {
			t.Fatalf("attempt report fails its schema: %v", err)
		}
		if len(m.Data) > smallPayload {
			t.Fatalf("report of %d bytes", len(m.Data))
		}
		var rep schemas.AttemptReportMsg
		_ = json.Unmarshal(m.Data, &rep)
		if rep.JobID != j.ID || rep.Error.Code != schemas.CodeRuntimeCrashed || rep.Text != "" || rep.CompletionTokens != 0 {
			t.Fatalf("report %s %+v, %d bytes of text, %d tokens", rep.JobID, rep.Error, len(rep.Text), rep.CompletionTokens)
		}
	case <-ctx.Done():
		t.Fatal("no attempt report")
	}
}

// A hand-over that fails for good is followed by an attempt report, so the
// dispatcher that still holds the job retries it at once instead of after its
// attempt_timeout. Mutation caught: finish returning after the failed
// hand-over without reportAttempt: no report arrives.
func TestFailedHandOverIsReported(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	cfg := testConfig(t, b, "w-nohand")
	cfg.ResultTimeout = 300 * time.Millisecond
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.nc, a.mark = b.nc, b.nc.NewInbox() // what Start sets; this test needs no runtime
	handOvers := 0
	a.handOver = func(context.Context, string, []byte) ([]byte, error) {
		handOvers++
		return nil, errors.New("the bus refused it")
	}
	reports, err := b.nc.SubscribeSync(subjects.Attempt(cfg.WorkerID))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	res := &schemas.ResultMsg{
		Type: "result", JobID: "job-nohand", Tenant: "acme", Attempt: 2, Seq: 5, Status: schemas.StatusCompleted,
		FinishReason: schemas.FinishStop, Text: "all of it", Usage: schemas.Usage{CompletionTokens: 4, TotalTokens: 4},
		Model: "tiny", WorkerID: cfg.WorkerID, FinishedAt: time.Now().UTC(),
	}
	a.finish(t.Context(), res, testDispatcher, "")
	m, err := reports.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatalf("no attempt report after %d failed hand-overs: %v", handOvers, err)
	}
	if err := schemas.Validate(schemas.AttemptReport, m.Data); err != nil {
		t.Fatal(err)
	}
	var rep schemas.AttemptReportMsg
	_ = json.Unmarshal(m.Data, &rep)
	if rep.JobID != res.JobID || rep.Tenant != "acme" || rep.Attempt != 2 || rep.WorkerID != cfg.WorkerID ||
		rep.Error.Code != schemas.CodeHandOverFailed || !rep.Error.Retryable || !schemas.Retryable(rep.Error.Code) ||
		rep.Text != "" || rep.CompletionTokens != 0 || handOvers < 2 {
		t.Fatalf("report %+v after %d hand-overs", rep, handOvers)
	}
}
