package bus

import (
	"context"
	"encoding/json"
	"os"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// testBus is one embedded server, a connection and a JetStream context on it.
type testBus struct {
	srv *natsserver.Server
	dir string
	nc  *nats.Conn
	js  jetstream.JetStream
}

// startBus starts an embedded server on a random port with a t.TempDir() store,
// provisions it with popts and connects. Everything is torn down in t.Cleanup.
func startBus(t *testing.T, popts jsprov.Options) *testBus {
	t.Helper()
	b := &testBus{dir: t.TempDir()}
	b.srv = startServerAt(t, b.dir, natsserver.Options{})
	b.nc, b.js = connectTo(t, b.srv)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := jsprov.Provision(ctx, b.js, popts); err != nil {
		t.Fatalf("Provision: %v", err)
	}
	return b
}

// client is a Client of tenant on b's connection.
func (b *testBus) client(t *testing.T, tenant string) *Client {
	t.Helper()
	p, err := NewClient(b.nc, WithTenant(tenant))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// startServerAt starts a server on dir, shut down in t.Cleanup.
func startServerAt(t *testing.T, dir string, opts natsserver.Options) *natsserver.Server {
	t.Helper()
	opts.Port = -1
	opts.StoreDir = dir
	opts.Logger = testLogger(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	srv, err := natsserver.Start(ctx, opts)
	if err != nil {
		t.Fatalf("natsserver.Start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	})
	return srv
}

func connectTo(t *testing.T, srv *natsserver.Server) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	nc, err := Connect(ctx, ConnectOptions{URLs: []string{srv.ClientURL()}, Name: t.Name(), Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatalf("jetstream.New: %v", err)
	}
	return nc, js
}

// testLogger shows warnings and errors in the test log; BUS_TEST_LOG=debug shows more.
func testLogger(t *testing.T) zerolog.Logger {
	lvl := zerolog.WarnLevel
	if os.Getenv("BUS_TEST_LOG") == "debug" {
		lvl = zerolog.DebugLevel
	}
	return zerolog.New(zerolog.NewTestWriter(t)).Level(lvl).With().Timestamp().Logger()
}

func ctxT(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func streamMsgs(t *testing.T, js jetstream.JetStream, name string) uint64 {
	t.Helper()
	s, err := js.Stream(ctxT(t), name)
	if err != nil {
		t.Fatalf("stream %s: %v", name, err)
	}
	info, err := s.Info(ctxT(t))
	if err != nil {
		t.Fatalf("stream %s info: %v", name, err)
	}
	return info.State.Msgs
}

// jobsInStream reads every message of JOBS without consuming it.
func jobsInStream(t *testing.T, js jetstream.JetStream) []*jetstream.RawStreamMsg {
	t.Helper()
	s, err := js.Stream(ctxT(t), subjects.StreamJobs)
	if err != nil {
		t.Fatalf("stream JOBS: %v", err)
	}
	info, err := s.Info(ctxT(t))
	if err != nil {
		t.Fatalf("JOBS info: %v", err)
	}
	var out []*jetstream.RawStreamMsg
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := s.GetMsg(ctxT(t), seq)
		if err != nil {
			t.Fatalf("JOBS seq %d: %v", seq, err)
		}
		out = append(out, m)
	}
	return out
}

func decodeJob(t *testing.T, data []byte) schemas.JobRequest {
	t.Helper()
	var j schemas.JobRequest
	if err := json.Unmarshal(data, &j); err != nil {
		t.Fatalf("decode job: %v", err)
	}
	return j
}

func newJob(id, prompt string) *schemas.JobRequest {
	return &schemas.JobRequest{ID: id, Model: "tiny", Prompt: prompt, MaxTokens: 16}
}

func newResult(jobID string, attempt int, worker, text string) *schemas.ResultMsg {
	return &schemas.ResultMsg{
		Type: "result", JobID: jobID, Attempt: attempt, Seq: 3, Status: schemas.StatusCompleted,
		FinishReason: "stop", Text: text, Usage: schemas.Usage{PromptTokens: 2, CompletionTokens: 3, TotalTokens: 5},
		WorkerID: worker, FinishedAt: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
	}
}
