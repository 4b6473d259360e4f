package bus

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

func TestServerSyncAlwaysIsSet(t *testing.T) {
	t.Parallel()
	for _, always := range []bool{true, false} {
		t.Run(strconv.FormatBool(always), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			srv := startServerAt(t, dir, ServerOptions{SyncAlways: always, SyncInterval: 7 * time.Second})
			cfg := srv.NATSServer().JetStreamConfig()
			if cfg == nil {
				t.Fatal("JetStream not enabled")
			}
			if cfg.SyncAlways != always {
				t.Errorf("JetStream SyncAlways = %v, want %v", cfg.SyncAlways, always)
			}
			if cfg.SyncInterval != 7*time.Second {
				t.Errorf("JetStream SyncInterval = %v, want 7s", cfg.SyncInterval)
			}
			if cfg.StoreDir == "" || !isUnder(cfg.StoreDir, dir) {
				t.Errorf("store dir %q not under %q", cfg.StoreDir, dir)
			}
		})
	}
}

func isUnder(path, dir string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !filepath.IsAbs(rel) && (len(rel) < 2 || rel[:2] != "..")
}

func TestServerStartFailsOnBadStoreDir(t *testing.T) {
	t.Parallel()
	file := filepath.Join(t.TempDir(), "not-a-dir")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	srv, err := StartServer(ctx, ServerOptions{Port: -1, StoreDir: file, Logger: testLogger(t)})
	if err == nil {
		_ = srv.Shutdown(ctx)
		t.Fatal("StartServer on a regular file as store dir: want error")
	}
	if time.Since(start) > 5*time.Second {
		t.Errorf("failure took %v: should be reported at once, not after a ready timeout", time.Since(start))
	}
	if _, err := StartServer(ctx, ServerOptions{Port: -1}); err == nil {
		t.Fatal("StartServer without StoreDir: want error")
	}
}

func TestServerShutdownTwice(t *testing.T) {
	t.Parallel()
	srv := startServerAt(t, t.TempDir(), ServerOptions{})
	nc, _ := connectTo(t, srv)
	closed := make(chan struct{})
	nc.SetClosedHandler(func(_ *nats.Conn) { close(closed) })
	ctx := ctxT(t)
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("second Shutdown: %v", err)
	}
	if srv.NATSServer().Running() {
		t.Fatal("server still running after Shutdown")
	}
	// The client sees the server go away (it keeps reconnecting; closing ends it).
	nc.Close()
	<-closed
}

func TestConnectToStoppedServerRespectsCtx(t *testing.T) {
	t.Parallel()
	srv := startServerAt(t, t.TempDir(), ServerOptions{})
	url := srv.ClientURL()
	if err := srv.Shutdown(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
	defer cancel()
	start := time.Now()
	nc, err := Connect(ctx, ConnectOptions{URLs: []string{url}, Logger: testLogger(t)})
	if err == nil {
		nc.Close()
		t.Fatal("Connect to a stopped server: want error")
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("err = %v, want one matching context.DeadlineExceeded", err)
	}
	if d := time.Since(start); d < 600*time.Millisecond || d > 3*time.Second {
		t.Errorf("Connect returned after %v; want it to retry until the 700ms deadline and stop then", d)
	}
}

// A service started before the bus connects once the bus is up.
func TestConnectRetriesUntilServerStarts(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	_ = l.Close()

	type result struct {
		nc  *nats.Conn
		err error
	}
	got := make(chan result, 1)
	attempted := make(chan struct{})
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		close(attempted)
		nc, err := Connect(ctx, ConnectOptions{URLs: []string{"nats://127.0.0.1:" + strconv.Itoa(port)}, Logger: testLogger(t)})
		got <- result{nc, err}
	}()
	<-attempted
	// Let at least one attempt fail before the server exists.
	select {
	case r := <-got:
		t.Fatalf("Connect returned before the server started: %v", r.err)
	case <-time.After(300 * time.Millisecond):
	}
	ctx := ctxT(t)
	srv, err := StartServer(ctx, ServerOptions{Port: port, StoreDir: t.TempDir(), Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("StartServer: %v", err)
	}
	t.Cleanup(func() { _ = srv.Shutdown(context.Background()) })
	r := <-got
	if r.err != nil {
		t.Fatalf("Connect: %v", r.err)
	}
	defer r.nc.Close()
	if !r.nc.IsConnected() {
		t.Fatal("connection not connected")
	}
}

// Queued jobs survive a restart of the bus on the same store directory.
func TestRestartKeepsQueuedJobs(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ctx := ctxT(t)
	srv1, err := StartServer(ctx, ServerOptions{Port: -1, StoreDir: dir, SyncAlways: true, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv1.Shutdown(context.Background()) })
	nc1, js1 := connectTo(t, srv1)
	if err := Provision(ctx, js1, ProvisionOptions{}); err != nil {
		t.Fatal(err)
	}
	p, err := NewProducer(nc1)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{}
	for i := range 3 {
		j := newJob("", "prompt "+strconv.Itoa(i))
		if _, err := p.Submit(ctx, j); err != nil {
			t.Fatalf("Submit: %v", err)
		}
		want[j.ID] = j.Prompt
	}
	nc1.Close()
	if err := srv1.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}

	srv2 := startServerAt(t, dir, ServerOptions{})
	_, js2 := connectTo(t, srv2)
	msgs := jobsInStream(t, js2)
	if len(msgs) != len(want) {
		t.Fatalf("after restart JOBS has %d messages, want %d", len(msgs), len(want))
	}
	for _, m := range msgs {
		j := decodeJob(t, m.Data)
		if want[j.ID] != j.Prompt || m.Subject != JobSubject("", "normal", j.ID) {
			t.Errorf("after restart: job %s on %s with prompt %q; want prompt %q", j.ID, m.Subject, j.Prompt, want[j.ID])
		}
	}
	// Provisioning the restarted bus again keeps them too.
	if err := Provision(ctx, js2, ProvisionOptions{}); err != nil {
		t.Fatal(err)
	}
	if n := streamMsgs(t, js2, StreamJobs); n != 3 {
		t.Fatalf("after re-provision JOBS has %d messages, want 3", n)
	}
}
