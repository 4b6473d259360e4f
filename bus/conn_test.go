package bus

import (
	"context"
	"errors"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/nats-io/nats.go"
)

func TestConnectToStoppedServerRespectsCtx(t *testing.T) {
	t.Parallel()
	srv := startServerAt(t, t.TempDir(), natsserver.Options{})
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
	srv, err := natsserver.Start(ctx, natsserver.Options{Port: port, StoreDir: t.TempDir(), Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("natsserver.Start: %v", err)
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
	srv1, err := natsserver.Start(ctx, natsserver.Options{Port: -1, StoreDir: dir, SyncAlways: true, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv1.Shutdown(context.Background()) })
	nc1, js1 := connectTo(t, srv1)
	if err := jsprov.Provision(ctx, js1, jsprov.Options{}); err != nil {
		t.Fatal(err)
	}
	p, err := NewClient(nc1)
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

	srv2 := startServerAt(t, dir, natsserver.Options{})
	_, js2 := connectTo(t, srv2)
	msgs := jobsInStream(t, js2)
	if len(msgs) != len(want) {
		t.Fatalf("after restart JOBS has %d messages, want %d", len(msgs), len(want))
	}
	for _, m := range msgs {
		j := decodeJob(t, m.Data)
		if want[j.ID] != j.Prompt || m.Subject != subjects.Job("", "normal", j.ID) {
			t.Errorf("after restart: job %s on %s with prompt %q; want prompt %q", j.ID, m.Subject, j.Prompt, want[j.ID])
		}
	}
	// Provisioning the restarted bus again keeps them too.
	if err := jsprov.Provision(ctx, js2, jsprov.Options{}); err != nil {
		t.Fatal(err)
	}
	if n := streamMsgs(t, js2, subjects.StreamJobs); n != 3 {
		t.Fatalf("after re-provision JOBS has %d messages, want 3", n)
	}
}
