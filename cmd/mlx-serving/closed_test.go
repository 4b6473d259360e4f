package main

import (
	"context"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/auth"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
)

// TestServiceWhoseCredentialsAreRefusedExits: a gateway connected with its
// credential; the server comes back on the same port with other credentials
// (auth init --force, the runbook's way to add or retire a Mac, then a
// restart). The client is refused twice while reconnecting and closes the
// connection for good; the service must then exit unreachable (3), so its
// supervisor restarts it with the new credential files. It kept running,
// logging failed heartbeats and answering /readyz 503, and nothing restarted
// it (red team round 20, F2).
//
// Mutation caught: runService's OnClosed not cancelling the service (the
// gateway runs on: no exit within the minute): red.
func TestServiceWhoseCredentialsAreRefusedExits(t *testing.T) {
	t.Parallel()
	initAt := func() *auth.Store {
		s, err := auth.Init(auth.InitOptions{DataDir: t.TempDir(), Tenants: []string{"a"}, WorkerIDs: []string{"w1"}, BcryptCost: 4})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	old, rotated := initAt(), initAt()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	srv, err := natsserver.Start(ctx, natsserver.Options{Port: -1, StoreDir: t.TempDir(), AuthConf: old.NATSAuthConfPath(), Account: auth.AccountSystem})
	if err != nil {
		t.Fatal(err)
	}
	url := srv.ClientURL()
	_, portStr, err := net.SplitHostPort(srv.NATSServer().Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		t.Fatal(err)
	}
	gw, err := old.Credential(auth.RoleGateway, "")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan int, 1)
	go func() {
		code, _, _ := runReal(t, "gateway", "--nats", url, "--nats-user", gw.User, "--nats-password", gw.Password,
			"--http-addr", "127.0.0.1:0", "--data-dir", t.TempDir(), "--log-level", "warn")
		done <- code
	}()
	for srv.NATSServer().NumClients() == 0 {
		select {
		case code := <-done:
			t.Fatalf("gateway exited %d before the restart", code)
		case <-time.After(20 * time.Millisecond):
		}
	}
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	srv2, err := natsserver.Start(ctx, natsserver.Options{Port: port, StoreDir: t.TempDir(), AuthConf: rotated.NATSAuthConfPath(), Account: auth.AccountSystem})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = srv2.Shutdown(context.Background()) }()
	select {
	case code := <-done:
		if code != exitUnreachable {
			t.Fatalf("gateway exited %d, want %d (unreachable)", code, exitUnreachable)
		}
	case <-time.After(time.Minute):
		t.Fatal("the gateway still runs a minute after its credential was refused")
	}
}
