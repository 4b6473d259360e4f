package auth

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

// secureBus is an embedded server that accepts only the users of a fresh store.
type secureBus struct {
	t     *testing.T
	store *Store
	srv   *natsserver.Server
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
	sb := &secureBus{t: t, store: store}
	admin, err := store.Credential(RoleAdmin, "")
	if err != nil {
		t.Fatal(err)
	}
	b := testenv.StartBusWith(t, testenv.BusOptions{
		Server:    natsserver.Options{AuthConf: store.NATSAuthConfPath()},
		Provision: jsprov.Options{WorkerTTL: 3 * time.Second},
		Connect:   bus.ConnectOptions{Name: admin.User, User: admin.User, Password: admin.Password, InboxPrefix: admin.InboxPrefix},
	})
	sb.srv = b.Server
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
