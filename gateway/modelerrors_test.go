package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jserr"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// The red-team's repro: a worker credential publishes a delete marker on a
// served model's key in the models bucket. The gateway (its fleet view and its
// producer's model check alike) still runs the model's jobs. So with a put
// carrying headers that nats.go reads for the server's (red team round 17,
// F3): its own Nats-Time-Stamp or Nats-Sequence, or Status: 404 on an empty
// value.
// Mutations caught: registry.ModelServed reading the key through kv.Get (as it
// did) answers 500 internal_error before the fromSubmit mapping, 503
// model_not_available after it; reading it with GetLastMsgForSubject answers
// 503 for each header case.
func TestModelDeleteMarkerDoesNotHideModel(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name   string
		header nats.Header
		data   []byte
	}{
		{"delete marker", nats.Header{"KV-Operation": {"DEL"}}, nil},
		{"garbage time stamp", nats.Header{"Nats-Time-Stamp": {"garbage"}}, []byte(testModel)},
		{"garbage sequence", nats.Header{"Nats-Sequence": {"xyz"}}, []byte(testModel)},
		{"status 404 on an empty value", nats.Header{"Status": {"404"}, "Description": {"No Messages"}}, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			tb := startBus(t, jsprov.Options{})
			startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens})
			_, srv := newTestGateway(t, tb, nil)

			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			m := nats.NewMsg(subjects.ModelEntry(testModel))
			for k, v := range c.header {
				m.Header[k] = v
			}
			m.Data = c.data
			if _, err := tb.js.PublishMsg(ctx, m); err != nil {
				t.Fatal(err)
			}
			for _, stream := range []bool{false, true} {
				resp := postJSON(t, srv.URL+"/v1/chat/completions", chatBody(stream, nil))
				if resp.StatusCode != http.StatusOK {
					expectError(t, resp, http.StatusOK, "", "")
				}
				resp.Body.Close()
			}
		})
	}
}

// failingFleet is the real fleet whose models bucket cannot be read.
type failingFleet struct{ Fleet }

func (failingFleet) ModelServed(context.Context, string) (bool, error) {
	return false, errors.New("bus: models bucket: nats: timeout")
}

// refusingJobs is the real bus whose Submit fails with err.
type refusingJobs struct {
	Jobs
	err error
}

func (j refusingJobs) Submit(context.Context, *schemas.JobRequest) (*bus.JobStream, error) {
	return nil, j.err
}

// Whatever the model lookup fails with, the gateway answers what it documents:
// 503 (clients retry), never 500 internal_error. A failed models-bucket read is
// bus_unavailable, at the gateway's own check and at Submit's; Submit's check
// finding the model unannounced, after the gateway saw a ready worker with it,
// is model_not_available.
// Mutations caught: run() answering a registry error with errInternal fails the
// first case; dropping the ErrModelCheck or the ErrModelNotServed case from
// fromSubmit fails the others (500 internal_error).
func TestModelLookupFailuresAre503(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	tb.registerWorker(t, "w2", schemas.WorkerReady, "another-model")

	_, srv := newTestGateway(t, tb, func(c *Config) { c.Fleet = failingFleet{c.Fleet} })
	for _, stream := range []bool{false, true} {
		expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(stream, nil)), http.StatusServiceUnavailable, "", "bus_unavailable")
	}

	tb.registerWorker(t, "w1", schemas.WorkerReady, testModel)
	for _, c := range []struct {
		err         error
		param, code string
	}{
		{fmt.Errorf("bus: submit x: %w: %w", bus.ErrModelCheck, errors.New("nats: timeout")), "", "bus_unavailable"},
		{fmt.Errorf("bus: submit x: %w: %q", bus.ErrModelNotServed, testModel), "model", "model_not_available"},
	} {
		_, srv := newTestGateway(t, tb, func(cfg *Config) { cfg.Jobs = refusingJobs{cfg.Jobs, c.err} })
		for _, stream := range []bool{false, true} {
			expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(stream, nil)), http.StatusServiceUnavailable, c.param, c.code)
			expectError(t, postJSON(t, srv.URL+"/v1/completions", map[string]any{"model": testModel, "prompt": "hi", "stream": stream}),
				http.StatusServiceUnavailable, c.param, c.code)
		}
	}
}

// A store that failed (a JetStream 5xx that is no limit) or did not answer in
// time is a 503 with Retry-After, which clients retry, not a 500
// internal_error. Red team round 22: a store broken by descriptor exhaustion
// answered every submit 500 for minutes.
// Mutations caught: fromSubmit without its ErrUnavailable case, or jserr.Map
// without IsUnavailable: 500 internal_error: red.
func TestStoreFailureIs503(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	tb.registerWorker(t, "w1", schemas.WorkerReady, testModel)
	broken := &jetstream.APIError{Code: 503, ErrorCode: 10077, Description: "error opening msg block file [\"/d/JOBS/msgs/103.blk\"]: open /d/JOBS/msgs/103.blk: too many open files"}
	for _, err := range []error{jserr.Map(broken, "submit x"), jserr.Map(fmt.Errorf("publish: %w", context.DeadlineExceeded), "submit x")} {
		_, srv := newTestGateway(t, tb, func(cfg *Config) { cfg.Jobs = refusingJobs{cfg.Jobs, err} })
		for _, stream := range []bool{false, true} {
			resp := postJSON(t, srv.URL+"/v1/chat/completions", chatBody(stream, nil))
			if resp.Header.Get("Retry-After") == "" {
				t.Errorf("%v: 503 without Retry-After", err)
			}
			expectError(t, resp, http.StatusServiceUnavailable, "", "bus_unavailable")
		}
	}
}

// /readyz says not ready while the server fails submits, and ready again once
// one is taken: before, it said ready while a stream with a critical write
// error refused every submit for minutes (round 22, F1).
// Mutation caught: ready without submits.check: 200 after the failed
// submit: red.
func TestReadyzSaysTheQueueFailsSubmits(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	tb.registerWorker(t, "w1", schemas.WorkerReady, testModel)
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens})
	jobs := &failingOnce{}
	_, srv := newTestGateway(t, tb, func(cfg *Config) { jobs.Jobs, cfg.Jobs = cfg.Jobs, jobs })
	readyz := func() (int, string) {
		r, err := http.Get(srv.URL + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		defer r.Body.Close()
		var body struct{ Reason string }
		_ = json.NewDecoder(r.Body).Decode(&body)
		return r.StatusCode, body.Reason
	}
	if code, reason := readyz(); code != http.StatusOK {
		t.Fatalf("readyz %d (%s) before any submit", code, reason)
	}
	jobs.set(jserr.Map(&jetstream.APIError{Code: 503, ErrorCode: 10077, Description: "error opening msg block file"}, "submit x"))
	expectError(t, postJSON(t, srv.URL+"/v1/completions", map[string]any{"model": testModel, "prompt": "hi"}), http.StatusServiceUnavailable, "", "bus_unavailable")
	if code, reason := readyz(); code != http.StatusServiceUnavailable || !strings.Contains(reason, "failed the last submit") {
		t.Fatalf("readyz %d (%q) after a submit the server failed, want 503 naming it", code, reason)
	}
	jobs.set(nil)
	if text := completionText(t, postJSON(t, srv.URL+"/v1/completions", map[string]any{"model": testModel, "prompt": "hi"})); text != "Hello, world!" {
		t.Fatalf("completion %q", text)
	}
	if code, reason := readyz(); code != http.StatusOK {
		t.Fatalf("readyz %d (%s) after a submit was taken", code, reason)
	}
}

// failingOnce fails Submit with the error set (set), while one is.
type failingOnce struct {
	Jobs
	mu  sync.Mutex
	err error
}

func (j *failingOnce) set(err error) {
	j.mu.Lock()
	j.err = err
	j.mu.Unlock()
}

func (j *failingOnce) Submit(ctx context.Context, job *schemas.JobRequest) (*bus.JobStream, error) {
	j.mu.Lock()
	err := j.err
	j.mu.Unlock()
	if err != nil {
		return nil, err
	}
	return j.Jobs.Submit(ctx, job)
}
