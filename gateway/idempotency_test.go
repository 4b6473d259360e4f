package gateway

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// completionText is the text of a one-choice, non-streamed completion.
func completionText(t *testing.T, resp *http.Response) string {
	t.Helper()
	if resp.StatusCode != http.StatusOK {
		expectError(t, resp, http.StatusOK, "", "")
	}
	body := decode[struct {
		Choices []struct {
			Text string `json:"text"`
		} `json:"choices"`
	}](t, resp.Body)
	if len(body.Choices) != 1 {
		t.Fatalf("choices %+v", body.Choices)
	}
	return body.Choices[0].Text
}

// A request retried with its Idempotency-Key names the job of its first try:
// a finished one answers from its record, streamed or not, and nothing runs
// again; another key, or the same key of another tenant, is another job. Red
// team round 21: with no key, a retry after a gateway crash ran the job twice.
// Mutation caught: run without keyedJobID (a fresh id per request): a second
// job reaches the worker: red.
func TestIdempotencyKeyAnswersTheFirstTrysJob(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	fw := startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens})
	_, srv := newTestGateway(t, tb, func(c *Config) {
		c.TokenTenants = map[string]string{"tok-a": "a", "tok-b": "b"}
	})
	body := map[string]any{"model": testModel, "prompt": "hi"}
	post := func(token, key string, stream bool) *http.Response {
		b := map[string]any{"model": testModel, "prompt": "hi", "stream": stream}
		return postJSON(t, srv.URL+"/v1/completions", b, "Authorization", "Bearer "+token, idempotencyHeader, key)
	}
	first := postJSON(t, srv.URL+"/v1/completions", body, "Authorization", "Bearer tok-a", idempotencyHeader, "k1")
	id := first.Header.Get("X-Mlx-Job-Id")
	if text := completionText(t, first); text != "Hello, world!" {
		t.Fatalf("first try: %q", text)
	}
	fw.nextJob(t)
	again := post("tok-a", "k1", false)
	if again.Header.Get("X-Mlx-Job-Id") != id || completionText(t, again) != "Hello, world!" {
		t.Fatalf("retry: job %q (first %q)", again.Header.Get("X-Mlx-Job-Id"), id)
	}
	texts, done := streamTexts(t, readSSE(t, post("tok-a", "k1", true)))
	if texts[0] != "Hello, world!" || !done {
		t.Fatalf("streamed retry: %q, [DONE] %v", texts[0], done)
	}
	select {
	case a := <-fw.Assignments():
		t.Fatalf("a retry ran job %s again", a.Jobs[0].Job.ID)
	default:
	}
	for _, other := range []struct{ token, key string }{{"tok-a", "k2"}, {"tok-b", "k1"}} {
		resp := post(other.token, other.key, false)
		if got := resp.Header.Get("X-Mlx-Job-Id"); got == id || completionText(t, resp) != "Hello, world!" {
			t.Fatalf("%s with key %s: job %q, the first's %q", other.token, other.key, got, id)
		}
		fw.nextJob(t)
	}
	expectError(t, post("tok-a", "has space", false), http.StatusBadRequest, idempotencyHeader, "invalid_value")
	// Two keys: which names the job? Refused (round 22: the first was taken).
	// Mutation caught: idempotencyKey without the count: 200: red.
	expectError(t, postJSON(t, srv.URL+"/v1/completions", body, "Authorization", "Bearer tok-a", idempotencyHeader, "k1", idempotencyHeader, "k9"),
		http.StatusBadRequest, idempotencyHeader, "invalid_value")
}

// A client with a key that leaves while its job runs does not cancel it, and
// its retry watches that job to its end: one run, completed. Without a key a
// leaving client still cancels (TestClientLeavingCancelsItsJob and others).
// Mutation caught: clientLeft cancelling whatever the key: one cancel sent:
// red.
func TestIdempotencyKeyRetryWatchesTheRunningJob(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	fw := startFakeWorker(t, tb, fakeworker.Plan{Tokens: []string{"a", "b"}, Block: true})
	spy := &cancelSpy{}
	_, srv := newTestGateway(t, tb, func(c *Config) { spy.Jobs = c.Jobs; c.Jobs = spy })
	// Both tokens streamed (the job waits for Release), the client goes; its
	// job must run on.
	leaveAfter(t, srv.URL+"/v1/completions", map[string]any{"model": testModel, "prompt": "hi", "stream": true}, `"b"`, idempotencyHeader, "run-1")
	job := fw.nextJob(t)
	// The job's reply subject loses the first request's interest, and gains
	// the retry's: the retry then watches the running job.
	acc := tb.Server.NATSServer().GlobalAccount()
	interest := func() int { return acc.Interest(job.ReplyTo) }
	testenv.WaitFor(t, 10*time.Second, "the first request gone", func() bool { return interest() == 0 })
	retried := make(chan *http.Response, 1)
	go func() {
		retried <- postJSON(t, srv.URL+"/v1/completions", map[string]any{"model": testModel, "prompt": "hi"}, idempotencyHeader, "run-1")
	}()
	testenv.WaitFor(t, 10*time.Second, "the retry watching the job", func() bool { return interest() == 1 })
	fw.Release()
	select {
	case r := <-retried:
		if text := completionText(t, r); text != "ab" {
			t.Fatalf("retry answered %q, want the run's ab", text)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the retry got no answer")
	}
	select {
	case a := <-fw.Assignments():
		t.Fatalf("job %s ran again", a.Jobs[0].Job.ID)
	default:
	}
	if n := spy.cancels.Load(); n != 0 {
		t.Fatalf("%d cancels sent for a job whose client sent a key", n)
	}
}

// oneInFlight is a gateway whose tenants may have one job in flight, its
// cancels counted, with a fake worker whose jobs wait for Release.
func oneInFlight(t *testing.T) (*testBus, fakeWorker, *cancelSpy, *httptest.Server) {
	t.Helper()
	return heldGateway(t, 1)
}

// heldGateway is a gateway whose tenants may have limit jobs in flight, its
// cancels and Ended lookups counted, before a fake worker that holds every job.
func heldGateway(t *testing.T, limit int) (tb *testBus, fw fakeWorker, spy *cancelSpy, srv *httptest.Server) {
	t.Helper()
	tb = startBus(t, jsprov.Options{})
	fw = startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens, Block: true})
	spy = &cancelSpy{}
	spy.gw, srv = newTestGateway(t, tb, func(c *Config) {
		spy.Jobs, c.Jobs = c.Jobs, spy
		c.Limits = TenantLimits{MaxInFlight: limit}
	})
	return tb, fw, spy, srv
}

// cancelSpy counts the cancels the gateway gw sends and its Ended lookups.
type cancelSpy struct {
	Jobs
	gw             *Gateway
	cancels, ended atomic.Int64
}

func (c *cancelSpy) Ended(ctx context.Context, tenant, jobID string) (bool, error) {
	c.ended.Add(1)
	return c.Jobs.Ended(ctx, tenant, jobID)
}

func (c *cancelSpy) Cancel(ctx context.Context, tenant, jobID, reason string) error {
	c.cancels.Add(1)
	return c.Jobs.Cancel(ctx, tenant, jobID, reason)
}

// A client with a key that leaves does not cancel its job, yet the job keeps
// its tenant's in-flight slot until it ends: before, leaving only returned,
// and a tenant limited to 1 in flight ran 4 jobs at once, keeping another
// tenant's request off the workers (the final review of round 21).
// Mutations caught: cancelJob returning for a keyed job without holding: no
// Ended lookup: red; serve not joining the hold: the retry refused 429, it
// never watches: red.
func TestIdempotencyKeyLeaveKeepsTheTenantsSlot(t *testing.T) {
	t.Parallel()
	tb, fw, spy, srv := oneInFlight(t)
	leaveAfter(t, srv.URL+"/v1/chat/completions", chatBody(true, nil), `"Hello"`, idempotencyHeader, "held-1")
	testenv.WaitFor(t, 10*time.Second, "the slot held until the job ends", func() bool { return spy.ended.Load() > 0 })
	if code := statusOf(t, srv.URL); code != http.StatusTooManyRequests {
		t.Fatalf("with the keyed job still running, a second request got %d, want 429", code)
	}
	// The retry the key is for joins the held slot and watches the job, not
	// refused 429 by its own first try's hold (round 21's last pass).
	job := fw.nextJob(t)
	acc := tb.Server.NATSServer().GlobalAccount()
	testenv.WaitFor(t, 10*time.Second, "the first try gone", func() bool { return acc.Interest(job.ReplyTo) == 0 })
	retried := make(chan *http.Response, 1)
	go func() {
		retried <- postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, nil), idempotencyHeader, "held-1")
	}()
	testenv.WaitFor(t, 10*time.Second, "the retry watching the job", func() bool { return acc.Interest(job.ReplyTo) == 1 })
	fw.Release()
	if r := <-retried; r.StatusCode != http.StatusOK {
		expectError(t, r, http.StatusOK, "", "")
	}
	// Counted before awaitSlotFree: its probe, answered 200, leaves, and
	// the gateway cancels that (unkeyed) job — one CI run counted it here.
	if n := spy.cancels.Load(); n != 0 {
		t.Fatalf("%d cancels for a keyed job", n)
	}
	awaitSlotFree(t, srv.URL, 10*time.Second, "after the keyed job ended")
}

// A retry whose key names a job that ended without completing is told so with
// a 422 no client retries: the job is not run again under the key, and a 5xx
// that says "retry" was retried in vain for as long as RESULTS keeps the
// record (round 21's key attack: four tries at an expired job's key). The
// first try gets the job's own answer.
// Mutation caught: failure returning fromResult for a watched job: 500
// runtime_crashed on the retry: red.
func TestIdempotencyKeyOfAFailedJobIsSpent(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens, Status: schemas.StatusFailed, ErrCode: schemas.CodeRuntimeCrashed})
	_, srv := newTestGateway(t, tb, nil)
	body := map[string]any{"model": testModel, "prompt": "hi"}
	first := postJSON(t, srv.URL+"/v1/completions", body, idempotencyHeader, "f1")
	// Its retry could only hear "spent": OpenAI's clients are told not to
	// (round 22). Mutation caught: failure without NoRetry: no header: red.
	if h := first.Header.Get("X-Should-Retry"); h != "false" {
		t.Errorf("a keyed job's failure sent X-Should-Retry %q, want false", h)
	}
	expectError(t, first, http.StatusInternalServerError, "", "runtime_crashed")
	expectError(t, postJSON(t, srv.URL+"/v1/completions", body, idempotencyHeader, "f1"), http.StatusUnprocessableEntity, idempotencyHeader, codeKeySpent)
	stream := map[string]any{"model": testModel, "prompt": "hi", "stream": true}
	expectError(t, postJSON(t, srv.URL+"/v1/completions", stream, idempotencyHeader, "f1"), http.StatusUnprocessableEntity, idempotencyHeader, codeKeySpent)
}

// A key names the request, not only the job: the same key with another body
// is another job, run with that body's parameters — while the first body's
// job is held, the second does not join its hold (the tenant at its limit is
// refused), and once it ended the second runs anew. Before, the key named
// the job alone and the second body got the first body's answer (round 21,
// "Not fixed"). A streamed retry of the first body still names its job
// (TestIdempotencyKeyAnswersTheFirstTrysJob).
// Mutation caught: keyedJobID without the fingerprint: the second body joins
// the hold and watches the first body's job (200, not 429): red.
func TestIdempotencyKeyNamesTheBody(t *testing.T) {
	t.Parallel()
	_, fw, spy, srv := oneInFlight(t)
	url := srv.URL + "/v1/completions"
	leaveAfter(t, url, map[string]any{"model": testModel, "prompt": "hi", "stream": true}, `"Hello"`, idempotencyHeader, "same")
	first := fw.nextJob(t)
	testenv.WaitFor(t, 10*time.Second, "the slot held until the job ends", func() bool { return spy.ended.Load() > 0 })
	other := map[string]any{"model": testModel, "prompt": "bye", "max_tokens": 5}
	expectError(t, postJSON(t, url, other, idempotencyHeader, "same"), http.StatusTooManyRequests, "", "")
	fw.Release()
	// The first body's job ends, and its hold with it: then the second body
	// runs (a 429 meanwhile creates no job).
	var resp *http.Response
	testenv.WaitFor(t, 10*time.Second, "the second body taken", func() bool {
		resp = postJSON(t, url, other, idempotencyHeader, "same")
		if resp.StatusCode == http.StatusTooManyRequests {
			_ = resp.Body.Close()
			return false
		}
		return true
	})
	id := resp.Header.Get("X-Mlx-Job-Id")
	if text := completionText(t, resp); text != "Hello, world!" || id == first.ID {
		t.Fatalf("another body under the key: job %q (the first %q), text %q", id, first.ID, text)
	}
	second := fw.nextJob(t)
	if second.ID != id || second.Prompt != "bye" || second.MaxTokens != 5 {
		t.Fatalf("the worker ran %s with prompt %q, max_tokens %d; want %s, bye, 5", second.ID, second.Prompt, second.MaxTokens, id)
	}
}

// The exact retry of a keyed request for n choices whose client left joins
// every held choice, not only the first: before, it joined choice 0's hold
// and was refused 429 for the others (round 22's second pass, F3).
// Mutation caught: runChoices acquiring every further slot: refused 429, it
// never watches: red.
func TestIdempotencyKeyRetryOfChoicesJoinsTheirHolds(t *testing.T) {
	t.Parallel()
	tb, fw, spy, srv := heldGateway(t, 2)
	url := srv.URL + "/v1/completions"
	body := map[string]any{"model": testModel, "prompt": "hi", "n": 2, "stream": true}
	leaveAfter(t, url, body, `"Hello"`, idempotencyHeader, "two")
	testenv.WaitFor(t, 10*time.Second, "both choices held", func() bool { return spy.ended.Load() >= 2 })
	first := fw.nextJob(t)
	acc := tb.Server.NATSServer().GlobalAccount()
	testenv.WaitFor(t, 10*time.Second, "the first try gone", func() bool { return acc.Interest(first.ReplyTo) == 0 })
	retried := make(chan *http.Response, 1)
	go func() {
		retried <- postJSON(t, url, map[string]any{"model": testModel, "prompt": "hi", "n": 2}, idempotencyHeader, "two")
	}()
	testenv.WaitFor(t, 10*time.Second, "the retry watching the held choices", func() bool { return acc.Interest(first.ReplyTo) == 1 })
	fw.Release()
	select {
	case r := <-retried:
		if r.StatusCode != http.StatusOK {
			expectError(t, r, http.StatusOK, "", "")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the retry got no answer")
	}
}

// The exact retry of a held keyed job joins it even while another keyed
// request of the tenant, under a new key, is still sending its body: a bound
// of one slotless body read per held job let the new key's read use it up,
// and the retry was refused 429 by its own job's hold (red team round 23,
// second pass F3). The connections a tenant holds are bounded by
// tenantConns instead.
// Mutation caught: keyedHolds allowing one slotless read per held job: the
// retry gets 429: red.
func TestARetryOfAHeldJobJoinsWhileAnotherKeyReads(t *testing.T) {
	t.Parallel()
	tb, fw, spy, srv := heldGateway(t, 1)
	leaveAfter(t, srv.URL+"/v1/chat/completions", chatBody(true, nil), `"Hello"`, idempotencyHeader, "held-1")
	testenv.WaitFor(t, 10*time.Second, "the slot held", func() bool { return spy.ended.Load() > 0 })
	job := fw.nextJob(t)
	acc := tb.Server.NATSServer().GlobalAccount()
	testenv.WaitFor(t, 10*time.Second, "the first try gone", func() bool { return acc.Interest(job.ReplyTo) == 0 })
	body, _ := json.Marshal(chatBody(true, nil))
	c, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	head := fmt.Sprintf("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s: new-key-2\r\nContent-Length: %d\r\n\r\n", idempotencyHeader, len(body))
	if _, err := c.Write([]byte(head + string(body[:1]))); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, 10*time.Second, "the new key's body being read", func() bool {
		spy.gw.bodies.mu.Lock()
		defer spy.gw.bodies.mu.Unlock()
		return spy.gw.bodies.used > 0
	})
	retried := make(chan *http.Response, 1)
	go func() {
		retried <- postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, nil), idempotencyHeader, "held-1")
	}()
	testenv.WaitFor(t, 10*time.Second, "the retry watching its job, or answered", func() bool {
		return acc.Interest(job.ReplyTo) == 1 || len(retried) > 0
	})
	if len(retried) > 0 {
		r := <-retried
		t.Fatalf("the retry answered %d before its job ended; want it to join the held job", r.StatusCode)
	}
	fw.Release()
	if r := <-retried; r.StatusCode != http.StatusOK {
		expectError(t, r, http.StatusOK, "", "")
	}
}
