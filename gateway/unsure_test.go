package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// leavingJobs stores every job (its Submit publishes on a context of its
// own) and then, for the jobs hang names, answers only once the request's
// context ends — an ack that never came back before the client left; fail,
// when set, refuses every job unstored instead. Cancel notes the ids.
type leavingJobs struct {
	Jobs
	hang   func(n int) bool // the n-th Submit (from 0) hangs
	fail   error
	mu     sync.Mutex
	n      int
	stored chan string
	cancel chan string
}

func (l *leavingJobs) Submit(ctx context.Context, job *schemas.JobRequest) (*bus.JobStream, error) {
	if l.fail != nil {
		return nil, l.fail
	}
	l.mu.Lock()
	n := l.n
	l.n++
	l.mu.Unlock()
	s, err := l.Jobs.Submit(context.WithoutCancel(ctx), job)
	if err != nil || !l.hang(n) {
		return s, err
	}
	l.stored <- job.ID
	<-ctx.Done()
	s.Close()
	return nil, ctx.Err()
}

func (l *leavingJobs) Cancel(ctx context.Context, tenant, jobID, reason string) error {
	l.cancel <- jobID
	return l.Jobs.Cancel(ctx, tenant, jobID, reason)
}

// A client that leaves while its job's submit waits for the store's ack gets
// its job cancelled, and so does every choice of an n > 1 request: before,
// the handler returned as if nothing were queued and the stored job ran to
// its end for nobody, outside its tenant's in-flight limit (red team round
// 17, HTTP M1). A job refused unstored (queue full) is not cancelled.
// Mutations caught: handleJob without cancelUnsure (the n=1 job is never
// cancelled); runChoices without it (the hanging second choice is not);
// refusedUnstored answering false for ErrQueueFull (a cancel is sent).
func TestClientLeavingDuringSubmitCancelsItsJob(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	tb.registerWorker(t, "w1", schemas.WorkerReady, testModel)
	for _, c := range []struct {
		n    int
		hang func(int) bool
	}{
		{1, func(int) bool { return true }},
		{2, func(n int) bool { return n == 1 }}, // the second choice's ack never comes
	} {
		lj := &leavingJobs{hang: c.hang, stored: make(chan string, 4), cancel: make(chan string, 8)}
		_, srv := newTestGateway(t, tb, func(cfg *Config) { lj.Jobs = cfg.Jobs; cfg.Jobs = lj })
		body, _ := json.Marshal(chatBody(true, map[string]any{"n": c.n, "max_tokens": 50}))
		ctx, leave := context.WithCancel(context.Background())
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/chat/completions", bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		done := make(chan struct{})
		go func() {
			defer close(done)
			if resp, err := http.DefaultClient.Do(req); err == nil {
				_ = resp.Body.Close()
			}
		}()
		var hung string
		select {
		case hung = <-lj.stored:
		case <-time.After(10 * time.Second):
			t.Fatalf("n=%d: the job was not submitted", c.n)
		}
		leave()
		<-done
		var got []string
		for len(got) < c.n {
			select {
			case id := <-lj.cancel:
				got = append(got, id)
			case <-time.After(10 * time.Second):
				t.Fatalf("n=%d: cancels %v; the stored job %s whose client left was not cancelled", c.n, got, hung)
			}
		}
		if !slices.Contains(got, hung) {
			t.Errorf("n=%d: cancelled %v, not the job %s whose submit was cut short", c.n, got, hung)
		}
	}

	lj := &leavingJobs{fail: bus.ErrQueueFull, cancel: make(chan string, 1)}
	_, srv := newTestGateway(t, tb, func(cfg *Config) { lj.Jobs = cfg.Jobs; cfg.Jobs = lj })
	resp := postJSON(t, srv.URL+"/v1/chat/completions", chatBody(false, nil))
	if resp.StatusCode != http.StatusTooManyRequests && resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("queue full: status %d", resp.StatusCode)
	}
	// cancelUnsure runs before the answer is written: none by now is none.
	select {
	case id := <-lj.cancel:
		t.Errorf("a job refused unstored (queue full) was cancelled: %s", id)
	default:
	}
}

// Only errors that prove the job unstored spare it the cancel: not
// ErrNotConnected, which Submit also says for a publish buffered for the
// reconnect or one whose ack alone was lost (this session's review).
// A submit that ended before its publish (ErrNotSubmitted) is spared it too:
// its cancel was kept a day for a job that never came (red team round 19,
// second pass).
// Mutations caught: refusedUnstored counting ErrNotConnected as unstored, and
// not counting ErrNotSubmitted.
func TestRefusedUnstored(t *testing.T) {
	for err, want := range map[error]bool{
		bus.ErrQueueFull: true, bus.ErrDuplicate: true, bus.ErrNoStream: true,
		bus.ErrNotConnected: false, context.DeadlineExceeded: false, context.Canceled: false,
		fmt.Errorf("%w: %w", bus.ErrNotSubmitted, context.Canceled): true,
	} {
		if got := refusedUnstored(err); got != want {
			t.Errorf("refusedUnstored(%v) = %v, want %v", err, got, want)
		}
	}
}

// Every known path answers a method it does not take with a JSON 405 naming
// the one it takes, not the mux's plain text or a 404 unknown_url (red team
// round 17, HTTP L4).
// Mutation caught: routes without the 405 handlers.
func TestWrongMethodIsAJSON405(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	_, srv := newTestGateway(t, tb, nil)
	for _, c := range []struct{ method, path, allow string }{
		{http.MethodPost, "/healthz", "GET, HEAD"},
		{http.MethodDelete, "/readyz", "GET, HEAD"},
		{http.MethodPut, "/metrics", "GET, HEAD"},
		{http.MethodGet, "/v1/chat/completions", http.MethodPost},
		{http.MethodGet, "/v1/completions", http.MethodPost},
		{http.MethodPost, "/v1/models", "GET, HEAD"},
		{http.MethodDelete, "/v1/models/tiny", "GET, HEAD"},
	} {
		req, _ := http.NewRequest(c.method, srv.URL+c.path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		e := expectError(t, resp, http.StatusMethodNotAllowed, "", "method_not_allowed")
		if got := resp.Header.Get("Allow"); got != c.allow {
			t.Errorf("%s %s: Allow %q, want %q (%s)", c.method, c.path, got, c.allow, e.Error.Message)
		}
	}
}
