package worker

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/breaker"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// End-to-end tests: a real embedded NATS server per test and the real Python
// runtime on the tiny model.

func within(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestE2EJobStreamsTokensAndRecordsOneResult(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, realConfig(t, b, "w-stream"), true)
	ctx := within(t, 60*time.Second)

	hb := waitHeartbeat(t, b.kv, "w-stream", 10*time.Second, func(h *schemas.HeartbeatMsg) bool {
		return h.State == schemas.WorkerReady && len(h.Models) == 1
	})
	if hb.Models[0] != "tiny" || hb.Slots != 4 || hb.MemoryBytes <= 0 || hb.Hostname == "" || hb.Platform == "" {
		t.Fatalf("heartbeat %+v", hb)
	}

	good := newJob("The quick brown fox", 24)
	resumed := newJob("Hello world", 12)
	bad := newJob("", 10) // neither prompt nor messages: fails the job schema
	bad.Prompt = ""
	bad.Tenant = "t1" // its failure is kept where tenant t1's producer may read it
	cGood, cRes, cBad := collect(t, b.nc, good.ReplyTo), collect(t, b.nc, resumed.ReplyTo), collect(t, b.nc, bad.ReplyTo)
	// The copies for the dispatcher that placed the job, on this worker's
	// progress subject (mutation caught: no alsoTo in runJob → no copy).
	pGood := collect(t, b.nc, subjects.Progress("w-stream", testDispatcher, good.Tenant))

	m := batch("tiny", good, resumed, bad)
	m.Jobs[1].Resume = &schemas.Resume{Text: "Once upon", CompletionTokens: 4}
	m.Jobs[1].Attempt = 2
	reply := assign(t, b.nc, a.ID(), m)
	if reply.Status != schemas.AssignAccepted || reply.WorkerID != "w-stream" || reply.BatchID != m.BatchID {
		t.Fatalf("reply %+v", reply)
	}

	r := cGood.untilResult(ctx)
	cGood.checkStream("")
	if r.Status != schemas.StatusCompleted || r.JobID != good.ID || r.Attempt != 1 || r.WorkerID != "w-stream" {
		t.Fatalf("result %+v", r)
	}
	if len(cGood.tokens) == 0 || r.Usage.CompletionTokens == 0 || r.Usage.CompletionTokens > 24 || r.Timings == nil || r.Timings.TotalMs <= 0 {
		t.Fatalf("result usage/timings %+v %+v after %d tokens", r.Usage, r.Timings, len(cGood.tokens))
	}
	if last := cGood.tokens[len(cGood.tokens)-1]; last.Tokens > r.Usage.CompletionTokens {
		t.Fatalf("token count %d beyond usage %d", last.Tokens, r.Usage.CompletionTokens)
	}
	// One connection delivers in publish order: every copy is in before the
	// result, and each is the token event the caller got. (The subject is the
	// tenant's: the resumed job's copies come there too.)
	var copies []schemas.TokenEventMsg
	for len(copies) < len(cGood.tokens) {
		if got, _ := pGood.next(ctx); got != nil && got.JobID == good.ID {
			copies = append(copies, *got)
		}
	}
	for len(pGood.ch) > 0 {
		if got, _ := pGood.next(ctx); got != nil && got.JobID == good.ID {
			copies = append(copies, *got)
		}
	}
	if !reflect.DeepEqual(copies, cGood.tokens) {
		t.Fatalf("progress copies %+v, reply subject had %+v", copies, cGood.tokens)
	}
	stored := fetchResult(t, b.js, good.ID)
	if stored.Text != r.Text || stored.Status != r.Status || stored.Seq != r.Seq {
		t.Fatalf("RESULTS %+v differs from the terminal event %+v", stored, r)
	}
	if n := resultsCount(t, b.js, good.ID); n != 1 {
		t.Fatalf("%d RESULTS records, want 1", n)
	}

	// The resumed job continues the earlier text: its result starts with it, its
	// events carry only the new text, and its budget is what the first attempt left.
	rr := cRes.untilResult(ctx)
	cRes.checkStream("Once upon")
	if rr.Status != schemas.StatusCompleted || rr.Attempt != 2 || !strings.HasPrefix(rr.Text, "Once upon") {
		t.Fatalf("resumed result %+v", rr)
	}
	if rr.Usage.CompletionTokens > 12 || rr.Usage.CompletionTokens < 4 {
		t.Fatalf("resumed usage %+v: must count the 4 earlier tokens and stay within 12", rr.Usage)
	}
	if len(cRes.tokens) > 0 && cRes.tokens[0].Tokens <= 4 {
		t.Fatalf("resumed token count starts at %d, want past the 4 earlier ones", cRes.tokens[0].Tokens)
	}

	// The invalid job failed alone, with invalid_request, recorded and sent.
	br := cBad.untilResult(ctx)
	if br.Status != schemas.StatusFailed || br.Error == nil || br.Error.Code != "invalid_request" || len(cBad.tokens) != 0 {
		t.Fatalf("invalid job result %+v", br)
	}
	if got := fetchTenantResult(t, b.js, "t1", bad.ID); got.Status != schemas.StatusFailed || got.Tenant != "t1" {
		t.Fatalf("invalid job RESULTS %+v", got)
	}

	// A model this worker does not have: rejected, nothing runs.
	other := newJob("x", 5)
	other.Model = "other"
	if rep := assign(t, b.nc, a.ID(), batch("other", other)); rep.Status != schemas.AssignRejected || rep.Error == nil || rep.Error.Code != schemas.CodeModelNotLoaded {
		t.Fatalf("unknown model: %+v", rep)
	}
}

// Four jobs in one assignment run together in the runtime's batch: on one
// subscription to all their reply subjects (the worker publishes every token
// event on one connection, so this order is its publish order) each job's first
// token comes before any job's last token. Jobs run one after another would
// show job 0's last token before job 1's first.
//
// Mutation caught: worker/job.go runJob, hold a package-level sync.Mutex around
// `c.Generate(...)` (the worker serializes its jobs): red here ("jobs did not
// overlap"), and on the tiny model already at the AssignFull check, since the
// serialized jobs finish and free their slots before the last one starts.
func TestE2EBatchSharesRuntimeAndFullWhenSlotsTaken(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, realConfig(t, b, "w-batch"), true)
	ctx := within(t, 120*time.Second)

	var jobs []schemas.JobRequest
	var cols []*collector
	index := map[string]int{}
	for i := 0; i < 4; i++ {
		j := newJob(fmt.Sprintf("Story number %d:", i), 400)
		jobs = append(jobs, j)
		index[j.ID] = i
		cols = append(cols, collect(t, b.nc, j.ReplyTo))
	}
	// All token events of the four jobs, in arrival order.
	order := make(chan int, 4*512)
	all, err := b.nc.Subscribe(subjects.ReplyNamespace("test"), func(m *nats.Msg) {
		var ev schemas.TokenEventMsg
		if json.Unmarshal(m.Data, &ev) == nil && ev.Type == "token" {
			if i, ok := index[ev.JobID]; ok {
				order <- i
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = all.Unsubscribe() })
	if err := b.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	if rep := assign(t, b.nc, a.ID(), batch("tiny", jobs...)); rep.Status != schemas.AssignAccepted || rep.FreeSlots != 0 {
		t.Fatalf("batch of 4: %+v", rep)
	}
	for i, c := range cols {
		if tok, res := c.next(ctx); tok == nil {
			t.Fatalf("job %d ended before its first token: %+v", i, res)
		}
	}
	extra := newJob("one more", 5)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", extra)); rep.Status != schemas.AssignFull || rep.FreeSlots != 0 {
		t.Fatalf("assignment while all slots run: %+v", rep)
	}
	hb := waitHeartbeat(t, b.kv, "w-batch", 5*time.Second, func(h *schemas.HeartbeatMsg) bool { return h.InFlight == 4 })
	if hb.State != schemas.WorkerReady {
		t.Fatalf("busy worker announces %s", hb.State)
	}
	tokens := 0
	for i, c := range cols {
		r := c.untilResult(ctx)
		c.checkStream("")
		if r.Status != schemas.StatusCompleted {
			t.Fatalf("job %d: %+v", i, r)
		}
		tokens += len(c.tokens)
	}
	if err := all.Unsubscribe(); err != nil {
		t.Fatal(err)
	}
	if err := b.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	// The last token event of each job precedes its result, which was read, so
	// every token event has been delivered to the subscription.
	first, last := map[int]int{}, map[int]int{}
	for n := 0; n < tokens; n++ {
		var i int
		select {
		case i = <-order:
		case <-ctx.Done():
			t.Fatalf("saw %d of %d token events on the shared subscription", n, tokens)
		}
		if _, ok := first[i]; !ok {
			first[i] = n
		}
		last[i] = n
	}
	lastFirst, firstLast := 0, tokens
	for i := range 4 {
		lastFirst, firstLast = max(lastFirst, first[i]), min(firstLast, last[i])
	}
	if lastFirst >= firstLast {
		t.Fatalf("jobs did not overlap: a job's first token (event %d) came after another's last (event %d); first %v last %v", lastFirst, firstLast, first, last)
	}
	if err := a.jobs.waitIdle(ctx); err != nil {
		t.Fatal(err)
	}
	if rep := assign(t, b.nc, a.ID(), batch("tiny", extra)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("after the batch finished: %+v", rep)
	}
}

func TestE2ECancelMidStream(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, realConfig(t, b, "w-cancel"), true)
	ctx := within(t, 60*time.Second)

	j := newJob("Cancel me", 2000)
	c := collect(t, b.nc, j.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", j)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	if tok, _ := c.next(ctx); tok == nil {
		t.Fatal("no token before the result")
	}
	cancelJob(t, b.nc, a.ID(), j)
	r := c.untilResult(ctx)
	c.checkStream("")
	if r.Status != schemas.StatusCancelled || r.FinishReason != schemas.FinishCancelled || r.Usage.CompletionTokens >= 2000 {
		t.Fatalf("cancelled result %+v", r)
	}
	if got := fetchResult(t, b.js, j.ID); got.Status != schemas.StatusCancelled {
		t.Fatalf("RESULTS %+v", got)
	}
}

// A deadline that passes while the job runs cancels it in the runtime: expired.
func TestE2EDeadlineExpires(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, realConfig(t, b, "w-deadline"), true)
	ctx := within(t, 60*time.Second)
	j := newJob("Run out of time", 4000)
	dl := time.Now().Add(1500 * time.Millisecond)
	j.Deadline = &dl
	c := collect(t, b.nc, j.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", j)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	r := c.untilResult(ctx)
	c.checkStream("")
	if r.Status != schemas.StatusExpired || r.Error == nil || r.Error.Code != schemas.CodeDeadlineExceeded || time.Now().Before(dl) {
		t.Fatalf("expired result %+v", r)
	}
	if got := fetchResult(t, b.js, j.ID); got.Status != schemas.StatusExpired {
		t.Fatalf("RESULTS %+v", got)
	}

	// A job whose deadline is already gone when it arrives expires without running.
	late := newJob("too late", 10)
	past := time.Now().Add(-time.Second)
	late.Deadline = &past
	cl := collect(t, b.nc, late.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", late)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	lr := cl.untilResult(ctx)
	if lr.Status != schemas.StatusExpired || len(cl.tokens) != 0 {
		t.Fatalf("late job %+v after %d tokens", lr, len(cl.tokens))
	}
}

func TestE2ERuntimeKilledMidStream(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, realConfig(t, b, "w-crash"), true)
	ctx := within(t, 90*time.Second)

	j := newJob("Crash during this", 4000)
	c := collect(t, b.nc, j.ReplyTo)
	reports := attemptReports(t, b.nc, a.ID())
	pid := a.RuntimePID()
	if rep := assign(t, b.nc, a.ID(), batch("tiny", j)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	for i := 0; i < 3; i++ {
		if tok, _ := c.next(ctx); tok == nil {
			t.Fatal("result before the crash")
		}
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var rep schemas.AttemptReportMsg
	select {
	case m := <-reports:
		if err := schemas.Validate(schemas.AttemptReport, m.Data); err != nil {
			t.Fatalf("attempt report fails its schema: %v: %s", err, m.Data)
		}
		_ = json.Unmarshal(m.Data, &rep)
	case <-ctx.Done():
		t.Fatal("no attempt report")
	}
	// Drain what reached the reply subject before the crash: no terminal among it.
	for {
		select {
		case m := <-c.ch:
			var head struct{ Type string }
			_ = json.Unmarshal(m.Data, &head)
			if head.Type != "token" {
				t.Fatalf("a crashed attempt sent %s", m.Data)
			}
			var ev schemas.TokenEventMsg
			_ = json.Unmarshal(m.Data, &ev)
			c.tokens = append(c.tokens, ev)
			continue
		default:
		}
		break
	}
	c.checkStream("")
	var sent strings.Builder
	for _, ev := range c.tokens {
		sent.WriteString(ev.Delta)
	}
	if rep.Error.Code != schemas.CodeRuntimeCrashed || !rep.Error.Retryable || rep.JobID != j.ID || rep.Attempt != 1 || rep.WorkerID != "w-crash" ||
		rep.Seq != len(c.tokens) || rep.Text != sent.String() || rep.CompletionTokens < len(c.tokens) {
		t.Fatalf("attempt report %+v after %d tokens %q", rep, len(c.tokens), sent.String())
	}
	if n := resultsCount(t, b.js, j.ID); n != 0 {
		t.Fatalf("a crashed attempt wrote %d RESULTS records", n)
	}

	// The supervisor restarts the runtime and the next job succeeds on it. The
	// report can come before the supervisor has seen the process exit (the
	// generate fails first), so "ready" alone may still be the old runtime:
	// wait for ready on a new one.
	waitNewRuntime(t, ctx, a, pid)
	next := newJob("After the crash", 10)
	cn := collect(t, b.nc, next.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", next)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	if r := cn.untilResult(ctx); r.Status != schemas.StatusCompleted {
		t.Fatalf("job after restart: %+v", r)
	}
	cn.checkStream("")
}

func TestE2EBreakerOpensAndWorkerIsUnavailable(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	cfg := testConfig(t, b, "w-breaker")
	cfg.Python = "/bin/false" // exits at once, every time
	cfg.BreakerThreshold = 3
	cfg.BreakerCooldown = time.Hour
	a := startAgent(t, cfg, false)

	hb := waitHeartbeat(t, b.kv, "w-breaker", 20*time.Second, func(h *schemas.HeartbeatMsg) bool {
		return a.BreakerState() == breaker.Open && h.State == schemas.WorkerUnavailable
	})
	if len(hb.Models) != 0 {
		t.Fatalf("unavailable worker lists models %v", hb.Models)
	}
	j := newJob("x", 5)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", j)); rep.Status != schemas.AssignRejected || rep.Error == nil || rep.Error.Code != schemas.CodeRuntimeDown {
		t.Fatalf("assignment to an unavailable worker: %+v", rep)
	}
	if a.State() != StateUnavailable {
		t.Fatalf("state %s", a.State())
	}
}
