package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
	"weak"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// weighingJobs is the gateway's Jobs with a look at what a held request keeps:
// Submit notes weak pointers to each job and to its messages, and Cancel (which
// a jobCall calls while it is alive: its client left) collects garbage and
// reports whether any of them survived.
type weighingJobs struct {
	Jobs
	mu        sync.Mutex
	jobs      []weak.Pointer[schemas.JobRequest]
	messages  []weak.Pointer[schemas.Message]
	submitted chan struct{}
	kept      chan int // at each Cancel: how many jobs or messages were still reachable
}

func (h *weighingJobs) Submit(ctx context.Context, job *schemas.JobRequest) (*bus.JobStream, error) {
	s, err := h.Jobs.Submit(ctx, job)
	h.mu.Lock()
	h.jobs = append(h.jobs, weak.Make(job))
	h.messages = append(h.messages, weak.Make(&job.Messages[0]))
	h.mu.Unlock()
	h.submitted <- struct{}{}
	return s, err
}

func (h *weighingJobs) Cancel(ctx context.Context, tenant, jobID, reason string) error {
	runtime.GC()
	h.mu.Lock()
	n := 0
	for i := range h.jobs {
		if h.jobs[i].Value() != nil || h.messages[i].Value() != nil {
			n++
		}
	}
	h.mu.Unlock()
	select {
	case h.kept <- n:
	default: // a sibling choice's cancel: the first report is the one read
	}
	return h.Jobs.Cancel(ctx, tenant, jobID, reason)
}

// TestHeldRequestDropsItsJob: while a request waits for its answer, the
// gateway keeps nothing of its job but id, tenant and model: once the client
// leaves (the jobCall cancels the job, alive), the submitted job and its
// messages have been collected. Whole, streamed and n=2 answers. Red team round
// 11's F3: a held 0.96 MB request cost the gateway ~2.7 MB for up to 10 minutes.
// Mutation caught: run's `job = submitted(job)` removed (the jobCall holds the
// job: kept 1), or runChoices' jobCall given &job (kept 2).
func TestHeldRequestDropsItsJob(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name  string
		extra map[string]any
		jobs  int
	}{
		{"whole", nil, 1},
		{"stream", map[string]any{"stream": true}, 1},
		{"n=2", map[string]any{"n": 2}, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			tb := startBus(t, jsprov.Options{})
			tb.registerWorker(t, "w1", "ready", testModel) // announced, never serving: the request waits
			h := &weighingJobs{submitted: make(chan struct{}, c.jobs), kept: make(chan int, 1)}
			_, srv := newTestGateway(t, tb, func(cfg *Config) { h.Jobs = cfg.Jobs; cfg.Jobs = h })
			body, _ := json.Marshal(chatBody(false, map[string]any{"messages": []map[string]any{
				{"role": "user", "content": strings.Repeat("held ", 20000)}}}))
			for k, v := range c.extra {
				var m map[string]any
				_ = json.Unmarshal(body, &m)
				m[k] = v
				body, _ = json.Marshal(m)
			}
			ctx, leave := context.WithCancel(context.Background())
			defer leave()
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/chat/completions", bytes.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			done := make(chan struct{})
			go func() {
				defer close(done)
				if resp, err := http.DefaultClient.Do(req); err == nil {
					_ = resp.Body.Close()
				}
			}()
			for range c.jobs {
				select {
				case <-h.submitted:
				case <-time.After(10 * time.Second):
					t.Fatal("the job was not submitted")
				}
			}
			leave()
			select {
			case n := <-h.kept:
				if n != 0 {
					t.Fatalf("%d of %d submitted jobs still reachable while their request is held", n, c.jobs)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the gateway did not cancel the job of a client that left")
			}
			<-done
		})
	}
}
