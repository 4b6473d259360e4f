// Package testenv gives end-to-end tests the real parts they run against: the
// repository's runtime interpreter, the tiny model, and an embedded NATS server
// with JetStream on a temp dir, provisioned and shut down with the test.
package testenv

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
)

// RepoRoot is the module root, found from this file's location.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// Python is the runtime's interpreter: MLX_SERVING_PYTHON or python/.venv.
func Python(t testing.TB) string {
	t.Helper()
	p := os.Getenv("MLX_SERVING_PYTHON")
	if p == "" {
		p = filepath.Join(RepoRoot(), "python", ".venv", "bin", "python")
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("runtime interpreter %s missing (run `go tool task setup`): %v", p, err)
	}
	return p
}

var (
	modelOnce sync.Once
	modelDir  string
	modelErr  error
)

// TinyModel is MLX_SERVING_TINY_MODEL or <repo>/.cache/tiny-model, generated on
// first use by the runtime's own generator.
func TinyModel(t testing.TB) string {
	t.Helper()
	python := Python(t)
	modelOnce.Do(func() {
		modelDir = os.Getenv("MLX_SERVING_TINY_MODEL")
		if modelDir == "" {
			modelDir = filepath.Join(RepoRoot(), ".cache", "tiny-model")
		}
		if _, err := os.Stat(filepath.Join(modelDir, "config.json")); err == nil {
			return
		}
		out, err := exec.Command(python, "-m", "mlx_serving_runtime.tinymodel", modelDir).CombinedOutput()
		if err != nil {
			modelErr = err
			modelDir = string(out)
		}
	})
	if modelErr != nil {
		t.Fatalf("tiny model: %v\n%s", modelErr, modelDir)
	}
	return modelDir
}

// Bus is an embedded NATS server with provisioned streams, and a connection.
type Bus struct {
	Server *natsserver.Server
	Dir    string
	Conn   *nats.Conn
	JS     jetstream.JetStream
	// Workers is the worker registry (KV mlx_workers).
	Workers jetstream.KeyValue
}

// Logger writes to the test log at info level (debug is too much for a whole
// suite), so a failing test shows what led to it.
func Logger(t testing.TB) zerolog.Logger {
	return zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel).With().Timestamp().Logger()
}

// BusOptions shape StartBusWith's server, provisioning and connection.
type BusOptions struct {
	// Server: its port and store dir are the test's (random, a temp dir or
	// StartBusAt's); Users, SyncAlways and the rest are kept.
	Server natsserver.Options
	// Provision is what jsprov.Provision gets.
	Provision jsprov.Options
	// Connect is how the Bus's own connection connects (its URLs are the
	// server's): credentials, for a server with Users.
	Connect bus.ConnectOptions
}

// StartBus starts a server on a random port with a temp store, provisions it with
// opts, and connects. Everything is shut down in t.Cleanup.
func StartBus(t testing.TB, opts jsprov.Options) *Bus {
	t.Helper()
	return StartBusWith(t, BusOptions{Provision: opts})
}

// StartBusAt is StartBus on a given store dir (to restart on the same data).
func StartBusAt(t testing.TB, dir string, opts jsprov.Options) *Bus {
	t.Helper()
	return StartBusWith(t, BusOptions{Server: natsserver.Options{StoreDir: dir}, Provision: opts})
}

// StartBusWith is StartBus with server and connection options: the one
// "start NATS, provision, connect" of every package's tests (package bus's own
// tests excepted: this package imports bus; the packages it imports test from
// their external test packages).
func StartBusWith(t testing.TB, o BusOptions) *Bus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if o.Server.StoreDir == "" {
		o.Server.StoreDir = t.TempDir()
	}
	srv := StartServer(t, o.Server)
	b := &Bus{Server: srv, Dir: o.Server.StoreDir}
	o.Connect.URLs = []string{srv.ClientURL()}
	b.Conn = ConnectWith(t, o.Connect)
	var err error
	b.JS, err = jetstream.New(b.Conn)
	if err != nil {
		t.Fatal(err)
	}
	if err := jsprov.Provision(ctx, b.JS, o.Provision); err != nil {
		t.Fatal(err)
	}
	if b.Workers, err = b.JS.KeyValue(ctx, subjects.BucketWorkers); err != nil {
		t.Fatal(err)
	}
	return b
}

// StartServer starts the embedded server alone (no provisioning), on a random
// port and, unless opts names one, a temp store dir; it is shut down in
// t.Cleanup.
func StartServer(t testing.TB, opts natsserver.Options) *natsserver.Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	opts.Port = -1
	if opts.StoreDir == "" {
		opts.StoreDir = t.TempDir()
	}
	srv, err := natsserver.Start(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	})
	return srv
}

// StartJetStream starts a server alone (StartServer) and returns a JetStream
// context on a connection to it: for tests that build streams the way an
// earlier version did, then provision over them.
func StartJetStream(t testing.TB) jetstream.JetStream {
	t.Helper()
	srv := StartServer(t, natsserver.Options{})
	js, err := jetstream.New(Connect(t, srv.ClientURL()))
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// StreamMsgs is how many messages the stream holds now.
func (b *Bus) StreamMsgs(t testing.TB, name string) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := b.JS.Stream(ctx, name)
	if err != nil {
		t.Fatalf("stream %s: %v", name, err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatalf("stream %s info: %v", name, err)
	}
	return info.State.Msgs
}

// Connect opens another connection to the bus, named name, closed in
// t.Cleanup.
func (b *Bus) Connect(t testing.TB, name string) *nats.Conn {
	t.Helper()
	return ConnectWith(t, bus.ConnectOptions{URLs: []string{b.Server.ClientURL()}, Name: name})
}

// Stop shuts the server down (idempotent).
func (b *Bus) Stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = b.Server.Shutdown(ctx)
}

// Connect opens a connection closed in t.Cleanup.
func Connect(t testing.TB, url string) *nats.Conn {
	t.Helper()
	return ConnectWith(t, bus.ConnectOptions{URLs: []string{url}})
}

// ConnectWith opens a connection with opts, closed in t.Cleanup.
func ConnectWith(t testing.TB, opts bus.ConnectOptions) *nats.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	nc, err := bus.Connect(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// Context is a context bounded by d and cancelled with the test.
func Context(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// WaitFor polls cond (state owned by other goroutines) until it holds,
// failing tb after within: the one poll of the packages' tests.
func WaitFor(tb testing.TB, within time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
