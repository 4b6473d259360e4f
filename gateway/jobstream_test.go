package gateway

// Tests of bus.JobStream (bus/stream.go) through its exported API. They live here
// because bus/ test files belong to the bus package's owner.

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/schemas"
)

func publishToken(t *testing.T, nc *nats.Conn, subject, jobID string, attempt, seq int, delta string) {
	t.Helper()
	data, _ := json.Marshal(schemas.TokenEventMsg{Type: "token", JobID: jobID, Attempt: attempt, Seq: seq, Delta: delta, Tokens: seq + 1})
	if err := nc.Publish(subject, data); err != nil {
		t.Fatal(err)
	}
}

func testResult(jobID string, attempt, seq int, text string) *schemas.ResultMsg {
	return &schemas.ResultMsg{Type: "result", JobID: jobID, Attempt: attempt, Seq: seq, Status: schemas.StatusCompleted,
		FinishReason: "stop", Text: text, Usage: schemas.Usage{PromptTokens: 1, CompletionTokens: seq, TotalTokens: seq + 1},
		FinishedAt: time.Now().UTC()}
}

func publishResult(t *testing.T, tb *testBus, subject string, r *schemas.ResultMsg, onReply bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := results.Record(ctx, tb.js, r); err != nil {
		t.Fatal(err)
	}
	if onReply {
		data, _ := json.Marshal(r)
		if err := tb.nc.Publish(subject, data); err != nil {
			t.Fatal(err)
		}
	}
	if err := tb.nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

func openTestStream(t *testing.T, tb *testBus, opts bus.StreamOptions) (*bus.JobStream, *schemas.JobRequest) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	job := &schemas.JobRequest{Model: testModel, Prompt: "p"}
	s, err := bus.OpenStream(ctx, tb.connect(t), nil, job, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	if job.ID == "" || job.ReplyTo != bus.ReplySubject("", job.ID) || s.JobID() != job.ID {
		t.Fatalf("defaults not filled: %+v", job)
	}
	return s, job
}

func collect(ctx context.Context, t *testing.T, s *bus.JobStream) []bus.Event {
	t.Helper()
	var evs []bus.Event
	for ev, err := range s.Events(ctx) {
		if err != nil {
			t.Fatalf("after %d events: %v", len(evs), err)
		}
		evs = append(evs, ev)
	}
	return evs
}

func TestJobStreamInOrder(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	s, job := openTestStream(t, tb, bus.StreamOptions{QuietAfter: 10 * time.Second})
	for i, d := range []string{"a", "b", "c"} {
		publishToken(t, tb.nc, job.ReplyTo, job.ID, 1, i, d)
	}
	publishToken(t, tb.nc, job.ReplyTo, "other-job", 1, 3, "x") // not ours
	publishResult(t, tb, job.ReplyTo, testResult(job.ID, 1, 3, "abc"), true)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	evs := collect(ctx, t, s)
	if len(evs) != 4 {
		t.Fatalf("%d events, want 4", len(evs))
	}
	text := ""
	for i, ev := range evs[:3] {
		if ev.Token == nil || ev.Token.Seq != i || ev.Missed != 0 || ev.Restarted || ev.Terminal() {
			t.Fatalf("event %d: %+v", i, ev)
		}
		text += ev.Token.Delta
	}
	last := evs[3]
	if !last.Terminal() || last.Recovered || last.Missed != 0 || last.Result.Text != text {
		t.Fatalf("terminal %+v", last)
	}
	if _, err := s.Next(ctx); !errors.Is(err, bus.ErrStreamEnded) {
		t.Fatalf("Next after the terminal: %v", err)
	}
}

// A retried job: attempt 2 continues the numbering (resume); a late event of
// attempt 1 and a repeated event are dropped; a gap in attempt 2 is counted.
func TestJobStreamAttemptChange(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	s, job := openTestStream(t, tb, bus.StreamOptions{QuietAfter: 10 * time.Second})
	pub := func(attempt, seq int, d string) { publishToken(t, tb.nc, job.ReplyTo, job.ID, attempt, seq, d) }
	pub(1, 0, "a")
	pub(1, 1, "b")
	pub(2, 2, "c") // resumed on another worker
	pub(1, 2, "X") // the old worker, late
	pub(2, 2, "c") // repeated
	pub(2, 4, "e") // seq 3 lost
	pub(3, 0, "f") // a retry that numbers from 0
	publishResult(t, tb, job.ReplyTo, testResult(job.ID, 3, 1, "abcdef"), true)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	evs := collect(ctx, t, s)
	type want struct {
		attempt   int
		delta     string
		restarted bool
		missed    int
	}
	wants := []want{{1, "a", false, 0}, {1, "b", false, 0}, {2, "c", true, 0}, {2, "e", false, 1}, {3, "f", true, 0}}
	if len(evs) != len(wants)+1 {
		t.Fatalf("%d events: %+v", len(evs), evs)
	}
	for i, w := range wants {
		ev := evs[i]
		if ev.Token == nil || ev.Attempt != w.attempt || ev.Token.Delta != w.delta || ev.Restarted != w.restarted || ev.Missed != w.missed {
			t.Fatalf("event %d: %+v (token %+v), want %+v", i, ev, ev.Token, w)
		}
	}
	if last := evs[len(evs)-1]; !last.Terminal() || last.Restarted || last.Attempt != 3 {
		t.Fatalf("terminal %+v", last)
	}
	if s.Missed() != 1 {
		t.Fatalf("Missed() = %d", s.Missed())
	}
	// These events carry no offsets, so each new attempt reads as one that
	// started over; whatever the stream made of them, Drop and Rest applied
	// give the result's text.
	if got := applied(evs); got != "abcdef" || s.Text() != got {
		t.Fatalf("caller's text %q, stream's %q", got, s.Text())
	}
}

// applied is the text a caller builds from evs the documented way: take back
// each Drop, append each delta and the terminal's Rest.
func applied(evs []bus.Event) string {
	text := ""
	for _, ev := range evs {
		text = text[:len(text)-ev.Drop.Bytes]
		if ev.Token != nil {
			text += ev.Token.Delta
		} else {
			text += ev.Rest
		}
	}
	return text
}

// The terminal event is lost (the caller was disconnected): the stream goes
// quiet and the RESULTS record is delivered, exactly once.
func TestJobStreamTerminalFallbackWhenQuiet(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	s, job := openTestStream(t, tb, bus.StreamOptions{QuietAfter: 200 * time.Millisecond})
	publishToken(t, tb.nc, job.ReplyTo, job.ID, 1, 0, "a")
	publishResult(t, tb, job.ReplyTo, testResult(job.ID, 1, 2, "ab"), false)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	evs := collect(ctx, t, s)
	if len(evs) != 2 || evs[0].Token == nil {
		t.Fatalf("events %+v", evs)
	}
	last := evs[1]
	if !last.Terminal() || !last.Recovered || last.Result.Text != "ab" || last.Missed != 1 {
		t.Fatalf("terminal %+v", last)
	}
	// A terminal event arriving late is not delivered a second time.
	data, _ := json.Marshal(testResult(job.ID, 1, 2, "ab"))
	_ = tb.nc.Publish(job.ReplyTo, data)
	if _, err := s.Next(ctx); !errors.Is(err, bus.ErrStreamEnded) {
		t.Fatalf("Next after the terminal: %v", err)
	}
}

// The caller's ctx ends before the stream went quiet: RESULTS is still consulted.
func TestJobStreamTerminalFallbackOnContextEnd(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	s, job := openTestStream(t, tb, bus.StreamOptions{QuietAfter: time.Hour})
	publishResult(t, tb, job.ReplyTo, testResult(job.ID, 1, 0, ""), false)

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	ev, err := s.Next(ctx)
	if err != nil || !ev.Terminal() || !ev.Recovered {
		t.Fatalf("Next: %+v %v", ev, err)
	}

	// Without a result, ctx's error comes back.
	s2, _ := openTestStream(t, tb, bus.StreamOptions{QuietAfter: time.Hour})
	ctx2, cancel2 := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel2()
	if _, err := s2.Next(ctx2); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Next without a result: %v", err)
	}
	// Closed by the caller: the stream ends.
	s2.Close()
	if _, err := s2.Next(context.Background()); !errors.Is(err, bus.ErrStreamEnded) {
		t.Fatalf("Next after Close: %v", err)
	}
}

// Watch on a job that finished before anyone listened returns its record at once.
func TestJobStreamWatchFinishedJob(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	id := bus.NewJobID()
	publishResult(t, tb, "", testResult(id, 1, 1, "z"), false)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := bus.Watch(ctx, tb.nc, nil, "", id, bus.ReplySubject("", id), bus.StreamOptions{QuietAfter: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ev, err := s.Next(ctx)
	if err != nil || !ev.Terminal() || ev.Result.Text != "z" {
		t.Fatalf("Next: %+v %v", ev, err)
	}
}

// SubmitStream submits through a Client and sees the worker's events.
func TestSubmitStream(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: []string{"x", "y"}})
	p, err := bus.NewClient(tb.nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	job := &schemas.JobRequest{Model: testModel, Prompt: "p"}
	s, ack, err := bus.SubmitStream(ctx, p, tb.nc, job, bus.StreamOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if ack.JobID != job.ID || ack.ReplyTo != s.ReplyTo() {
		t.Fatalf("ack %+v, stream on %s", ack, s.ReplyTo())
	}
	evs := collect(ctx, t, s)
	if len(evs) != 3 || evs[2].Result.Text != "xy" {
		t.Fatalf("events %+v", evs)
	}

	// A submit error closes the stream and is Submit's own.
	_, _, err = bus.SubmitStream(ctx, p, tb.nc, &schemas.JobRequest{Model: testModel, Prompt: "p", Sampling: schemas.Sampling{Temperature: new(9.0)}}, bus.StreamOptions{})
	var verr *schemas.ValidationError
	if !errors.As(err, &verr) || verr.Violations[0].Path != "$.temperature" {
		t.Fatalf("invalid job: %v", err)
	}
}
