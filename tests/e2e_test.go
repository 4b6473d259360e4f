package tests

import (
	"fmt"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A job goes producer → JOBS → dispatcher → worker → runtime and its tokens come
// back on the reply subject; the terminal record in RESULTS matches the stream.
//
// Mutation caught: worker/job.go runJob, drop `res.Usage = usage(gen, resumeTokens)`
// for a completed job (usage not counted).
func TestJobRunsEndToEnd(t *testing.T) {
	s := newStack(t)
	s.startDispatcher("d1")
	s.startWorker(4)
	ctx := testenv.Context(t, 2*time.Minute)

	o, err := s.submit(ctx, tinyJob("hello world", 16), nil)
	if err != nil {
		t.Fatal(err)
	}
	r := o.result
	if r.Status != schemas.StatusCompleted || r.FinishReason == "" {
		t.Fatalf("result: %+v", r)
	}
	if o.text != r.Text || r.Text == "" {
		t.Fatalf("streamed %q, result text %q", o.text, r.Text)
	}
	if r.Usage.CompletionTokens == 0 || r.Usage.PromptTokens == 0 || r.Usage.TotalTokens != r.Usage.PromptTokens+r.Usage.CompletionTokens {
		t.Fatalf("usage not counted: %+v", r.Usage)
	}
	if o.missed != 0 || o.restarted {
		t.Fatalf("gaps %d restarted %v", o.missed, o.restarted)
	}
	stored, err := results.Fetch(ctx, s.bus.JS, r.Tenant, r.JobID)
	if err != nil {
		t.Fatal(err)
	}
	if stored.Text != r.Text || stored.Status != r.Status || stored.Attempt != r.Attempt {
		t.Fatalf("RESULTS %+v differs from the terminal event %+v", stored, r)
	}
}

// Jobs submitted while no worker runs wait in JetStream and all complete once
// capacity arrives.
func TestJobsWaitForCapacity(t *testing.T) {
	s := newStack(t)
	s.startDispatcher("d1")
	ctx := testenv.Context(t, 3*time.Minute)

	const n = 6
	var wg sync.WaitGroup
	results := make([]*outcome, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], errs[i] = s.submit(ctx, tinyJob(fmt.Sprintf("job %d", i), 8), nil)
		}()
	}
	// Nothing can run yet: the jobs are queued, none has a result.
	deadline := time.Now().Add(10 * time.Second)
	for {
		info, err := s.bus.JS.Stream(ctx, subjects.StreamJobs)
		if err != nil {
			t.Fatal(err)
		}
		si, err := info.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if si.State.Msgs == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("JOBS holds %d, want %d queued", si.State.Msgs, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.startWorker(4)
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("job %d: %v", i, errs[i])
		}
		if results[i].result.Status != schemas.StatusCompleted {
			t.Fatalf("job %d: %+v", i, results[i].result)
		}
	}
}

// A runtime killed mid-stream: the job migrates (same worker after the restart, or
// another) and continues from the text the caller already holds — nothing
// repeated, nothing missing, nothing rewound. Sampling with a fixed seed makes a
// start-over distinguishable from a continuation only by the events' offsets and
// the StartedOver flag, which are asserted directly: the next attempt's first event
// starts at the byte offset where the first one stopped, its token count goes on
// from there, and the final text is attempt 1's text plus the continuation.
//
// Mutation caught: dispatcher/batcher.go launch, drop `aj.Resume = &r` (the
// retried attempt starts over at offset 0 → StartedOver); worker/job.go usage, drop
// `u.CompletionTokens += resumeTokens` (usage forgets attempt 1's tokens).
func TestRuntimeKilledMidStreamMigrates(t *testing.T) {
	s := newStack(t)
	s.startDispatcher("d1")
	w := s.startWorker(2)
	ctx := testenv.Context(t, 3*time.Minute)

	// Long enough that attempt 1 is still generating when its runtime dies:
	// token events come at most every 20 ms (worker.DefaultCoalesce), and the
	// tiny model can write 200 tokens before the fifth event arrives.
	job := tinyJob("a long story", 1500)
	temp, seed := 1.0, int64(42)
	job.Temperature, job.Seed = &temp, &seed
	var once sync.Once
	var toks []schemas.TokenEventMsg
	o, err := s.submit(ctx, job, func(ev bus.Event) {
		toks = append(toks, *ev.Token)
		if ev.Token.Seq == 3 {
			once.Do(func() {
				if err := syscall.Kill(w.RuntimePID(), syscall.SIGKILL); err != nil {
					t.Errorf("kill runtime: %v", err)
				}
			})
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	r := o.result
	if r.Status != schemas.StatusCompleted {
		t.Fatalf("result: %+v", r)
	}
	if r.Attempt < 2 || !o.restarted || len(o.attempts) < 2 {
		t.Fatalf("expected a second attempt: attempt %d restarted %v attempts %v", r.Attempt, o.restarted, o.attempts)
	}
	if o.rewound {
		t.Fatal("the new attempt started over instead of continuing (StartedOver)")
	}
	if o.text != r.Text {
		t.Fatalf("caller's text differs from the result:\nstream %q\nresult %q", o.text, r.Text)
	}
	if o.missed != 0 {
		t.Fatalf("missed %d events", o.missed)
	}
	// Split the stream at the first change of attempt.
	first := toks[0].Attempt
	var before strings.Builder
	var last, next *schemas.TokenEventMsg
	for i := range toks {
		if toks[i].Attempt != first {
			next = &toks[i]
			break
		}
		before.WriteString(toks[i].Delta)
		last = &toks[i]
	}
	if next == nil || last == nil {
		t.Fatalf("no token events of a second attempt: %+v", toks)
	}
	if next.Offset != before.Len() || next.Offset == 0 {
		t.Fatalf("attempt %d starts at offset %d, attempt %d stopped at %d", next.Attempt, next.Offset, first, before.Len())
	}
	if next.Tokens <= last.Tokens {
		t.Fatalf("attempt %d counts %d tokens after attempt %d's %d: completion tokens not resumed", next.Attempt, next.Tokens, first, last.Tokens)
	}
	if !strings.HasPrefix(r.Text, before.String()) || len(r.Text) == before.Len() {
		t.Fatalf("result %q does not continue attempt %d's text %q", r.Text, first, before.String())
	}
	// Usage spans the attempts: completion tokens count attempt 1's too.
	u, fin := r.Usage, toks[len(toks)-1].Tokens
	if u.CompletionTokens < fin || (r.FinishReason == "length" && u.CompletionTokens != 200) || u.TotalTokens != u.PromptTokens+u.CompletionTokens {
		t.Fatalf("usage %+v (finish %s) after %d streamed tokens", u, r.FinishReason, fin)
	}
	// Prompt tokens are the prompt's, as for a job that never moved: the text
	// fed back as continuation is completion, counted once.
	// Mutation caught: engine.py _finish reporting len(req.prompt_tokens)
	// (prompt plus continuation) as prompt_tokens.
	plain, err := s.submit(ctx, tinyJob("a long story", 1), nil)
	if err != nil {
		t.Fatal(err)
	}
	if u.PromptTokens != plain.result.Usage.PromptTokens {
		t.Fatalf("migrated job counts %d prompt tokens, the same prompt unmoved %d", u.PromptTokens, plain.result.Usage.PromptTokens)
	}
}

// Cancelling a running job stops it in the runtime: terminal cancelled.
//
// Mutation caught: dispatcher/cancel.go onCancel, not forwarding the cancel of a
// running job (`d.forwardCancel(j, reason)`): it completes with 2000 tokens.
func TestCancelRunningJob(t *testing.T) {
	s := newStack(t)
	s.startDispatcher("d1")
	s.startWorker(2)
	ctx := testenv.Context(t, 2*time.Minute)

	job := tinyJob("cancel me", 2000)
	var once sync.Once
	o, err := s.submit(ctx, job, func(ev bus.Event) {
		if ev.Token.Seq == 2 {
			once.Do(func() {
				if err := s.prod.Cancel(ctx, job.ID, "test"); err != nil {
					t.Errorf("cancel: %v", err)
				}
			})
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if o.result.Status != schemas.StatusCancelled {
		t.Fatalf("result: %+v", o.result)
	}
	if o.result.Usage.CompletionTokens >= 2000 {
		t.Fatalf("ran to the end: %+v", o.result.Usage)
	}
}

// A queued job that is cancelled never runs: its caller gets terminal cancelled
// and the job is deleted from JOBS. No sleeps: the cancel is sent once the job
// is stored in JOBS and the dispatcher's cancel subscription is on the server
// (startDispatcher waits for it).
//
// Mutation caught: dispatcher/cancel.go cancelInStream, drop
// `_ = d.jobsStream.DeleteMsg(ctx, raw.Sequence)` (the job stays in JOBS).
func TestCancelQueuedJob(t *testing.T) {
	s := newStack(t)
	s.startDispatcher("d1") // no worker: the job stays queued
	ctx := testenv.Context(t, time.Minute)
	job := tinyJob("never runs", 8)
	job.ID = bus.NewJobID()
	done := make(chan *outcome, 1)
	go func() {
		o, err := s.submit(ctx, job, nil)
		if err != nil {
			t.Error(err)
		}
		done <- o
	}()
	waitFor(t, 10*time.Second, func() bool { return jobQueued(t, s, job.ID) })
	if err := s.prod.Cancel(ctx, job.ID, "test"); err != nil {
		t.Fatal(err)
	}
	var o *outcome
	select {
	case o = <-done:
	case <-ctx.Done():
		t.Fatal("no terminal after the cancel")
	}
	if o == nil || o.result == nil || o.result.Status != schemas.StatusCancelled || o.tokens != 0 {
		t.Fatalf("outcome: %+v", o)
	}
	// The record is stored before the job is deleted, so the deletion may trail
	// the terminal by a moment.
	waitFor(t, 5*time.Second, func() bool { return !jobQueued(t, s, job.ID) })
}

func jobQueued(t *testing.T, s *stack, id string) bool {
	ctx := testenv.Context(t, 5*time.Second)
	st, err := s.bus.JS.Stream(ctx, subjects.StreamJobs)
	if err != nil {
		return false
	}
	for _, p := range schemas.Priorities {
		if _, err := st.GetLastMsgForSubject(ctx, subjects.Job("", p, id)); err == nil {
			return true
		}
	}
	return false
}

// waitFor polls cond; used only where no signal exists to wait on (broker state).
func waitFor(t *testing.T, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in time")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
