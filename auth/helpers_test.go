package auth

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

// secureBus is an embedded server that accepts only the users of a fresh store.
type secureBus struct {
	t     *testing.T
	store *Store
	srv   *bus.Server
}

// startSecureBus generates credentials for tenants a and b and workers w1 and w2,
// starts a server with them and provisions it as admin.
func startSecureBus(t *testing.T) *secureBus {
	t.Helper()
	dir := t.TempDir()
	store, err := Init(InitOptions{DataDir: dir, Tenants: []string{"a", "b"}, WorkerIDs: []string{"w1", "w2"}, BcryptCost: 4})
	if err != nil {
		t.Fatal(err)
	}
	ctx := testenv.Context(t, 30*time.Second)
	srv, err := bus.StartServer(ctx, bus.ServerOptions{Port: -1, StoreDir: t.TempDir(), Users: store.ServerUsers()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	})
	sb := &secureBus{t: t, store: store, srv: srv}
	admin := sb.connect(RoleAdmin, "")
	js, err := jetstream.New(admin.nc)
	if err != nil {
		t.Fatal(err)
	}
	if err := bus.Provision(ctx, js, bus.ProvisionOptions{WorkerTTL: 3 * time.Second}); err != nil {
		t.Fatal(err)
	}
	return sb
}

// client is a connection that records the server's asynchronous errors, which is
// how a permission violation of a publish or subscribe is reported.
type client struct {
	nc   *nats.Conn
	errs chan error
}

func (sb *secureBus) options(role Role, name string) bus.ConnectOptions {
	sb.t.Helper()
	c, err := sb.store.Credential(role, name)
	if err != nil {
		sb.t.Fatal(err)
	}
	return bus.ConnectOptions{URLs: []string{sb.srv.ClientURL()}, Name: c.User, User: c.User, Password: c.Password,
		InboxPrefix: c.InboxPrefix, MaxReconnects: 1}
}

func (sb *secureBus) connect(role Role, name string) *client {
	sb.t.Helper()
	opts := sb.options(role, name)
	ctx := testenv.Context(sb.t, 10*time.Second)
	nc, err := bus.Connect(ctx, opts)
	if err != nil {
		sb.t.Fatal(err)
	}
	sb.t.Cleanup(nc.Close)
	cl := &client{nc: nc, errs: make(chan error, 16)}
	nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		select {
		case cl.errs <- err:
		default:
		}
	})
	return cl
}

// violation waits for the server to report a permission violation naming subject.
func (c *client) violation(t *testing.T, kind, subject string) {
	t.Helper()
	// The flush makes the server process what was sent; its -ERR comes first.
	_ = c.nc.FlushTimeout(5 * time.Second)
	timer := time.NewTimer(10 * time.Second)
	defer timer.Stop()
	for {
		select {
		case err := <-c.errs:
			if errors.Is(err, nats.ErrPermissionViolation) && strings.Contains(err.Error(), kind) &&
				strings.Contains(err.Error(), `"`+subject+`"`) {
				return
			}
			t.Logf("other async error: %v", err)
		case <-timer.C:
			t.Fatalf("no permission violation for %s %q", kind, subject)
		}
	}
}
