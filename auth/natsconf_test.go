package auth

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

// fileServerConf is the smallest server configuration that takes its users
// from the include, the way ops/nats/*.conf do.
const fileServerConf = "host: 127.0.0.1\nport: -1\ninclude \"" + NATSAuthFile + "\"\n"

// startFileServer runs nats-server in process from the configuration file at
// path, as `nats-server -c path` would.
func startFileServer(t *testing.T, path string) *server.Server {
	t.Helper()
	opts, err := server.ProcessConfigFile(path)
	if err != nil {
		t.Fatalf("nats-server refuses %s: %v", path, err)
	}
	opts.NoSigs = true
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Start()
	t.Cleanup(srv.Shutdown)
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	return srv
}

func writeServerConf(t *testing.T, store *Store) string {
	t.Helper()
	path := filepath.Join(store.Dir(), "server.conf")
	if err := os.WriteFile(path, []byte(fileServerConf), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// The include holds every user auth init generated, with its hash and exactly
// the grants PermissionsFor gives it (and so the embedded server).
func TestNATSAuthConfGrantsWhatPermissionsForDoes(t *testing.T) {
	t.Parallel()
	store, err := Init(InitOptions{DataDir: t.TempDir(), Tenants: []string{"a", "b"}, WorkerIDs: []string{"w1"}, BcryptCost: 4})
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(store.NATSAuthConfPath())
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("%s has mode %v, want 0600", NATSAuthFile, fi.Mode().Perm())
	}
	opts, err := server.ProcessConfigFile(writeServerConf(t, store))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]*server.User{}
	for _, u := range opts.Users {
		got[u.Username] = u
	}
	ids := store.Identities()
	if len(got) != len(ids) {
		t.Fatalf("include has %d users, auth init generated %d", len(got), len(ids))
	}
	hashes := map[string]string{}
	for _, u := range store.ServerUsers() {
		hashes[u.Username] = u.Password
	}
	for _, id := range ids {
		u := got[id.User]
		if u == nil {
			t.Fatalf("include lacks user %s", id.User)
		}
		if !strings.HasPrefix(u.Password, "$2") || u.Password != hashes[id.User] {
			t.Errorf("%s: password %q, want its bcrypt hash", id.User, u.Password)
		}
		p, err := PermissionsFor(id)
		if err != nil {
			t.Fatal(err)
		}
		want := ServerUser(id.User, "", p).Permissions
		if !reflect.DeepEqual(u.Permissions, want) {
			t.Errorf("%s: permissions from the include\n%+v\nwant (PermissionsFor)\n%+v", id.User, describe(u.Permissions), describe(want))
		}
	}
}

func describe(p *server.Permissions) string {
	if p == nil {
		return "<nil>"
	}
	s := ""
	if p.Publish != nil {
		s += "publish " + strings.Join(p.Publish.Allow, " ") + "; "
	}
	if p.Subscribe != nil {
		s += "subscribe " + strings.Join(p.Subscribe.Allow, " ") + "; "
	}
	if p.Response != nil {
		s += "responses " + p.Response.Expires.String()
	}
	return s
}

// concrete turns an allow pattern into a subject it grants.
func concrete(pattern string) string {
	toks := strings.Split(pattern, ".")
	for i, tok := range toks {
		if tok == "*" || tok == ">" {
			toks[i] = "x"
		}
	}
	return strings.Join(toks, ".")
}

// A real nats-server started from a configuration that includes the generated
// file lets a producer publish what PermissionsFor grants it, refuses another
// role's subject, and refuses a wrong password.
// Mutation caught: auth/natsconf.go writeUser not writing the permissions block.
func TestServerFromNATSAuthConfEnforcesPermissions(t *testing.T) {
	t.Parallel()
	store, err := Init(InitOptions{DataDir: t.TempDir(), Tenants: []string{"a"}, WorkerIDs: []string{"w1"}, BcryptCost: 4})
	if err != nil {
		t.Fatal(err)
	}
	srv := startFileServer(t, writeServerConf(t, store))
	connect := func(role Role, name string, mutate func(*bus.ConnectOptions)) (*client, error) {
		c, err := store.Credential(role, name)
		if err != nil {
			t.Fatal(err)
		}
		opts := bus.ConnectOptions{URLs: []string{srv.ClientURL()}, User: c.User, Password: c.Password,
			InboxPrefix: c.InboxPrefix, MaxReconnects: 1}
		if mutate != nil {
			mutate(&opts)
		}
		nc, err := bus.Connect(testenv.Context(t, 10*time.Second), opts)
		if err != nil {
			return nil, err
		}
		t.Cleanup(nc.Close)
		cl := &client{nc: nc, errs: make(chan error, 16)}
		nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case cl.errs <- err:
			default:
			}
		})
		return cl, nil
	}

	// What the producer may publish comes from PermissionsFor, not from this test.
	perms, err := PermissionsFor(Identity{Role: RoleProducer, User: userName(RoleProducer, "a"), Tenant: "a"})
	if err != nil {
		t.Fatal(err)
	}
	allowed := ""
	for _, p := range perms.PublishAllow {
		if !strings.HasPrefix(p, "$") { // a bus subject, not a JetStream API call
			allowed = concrete(p)
			break
		}
	}
	// The dispatcher's assignment to a worker: never a producer's to send.
	const refused = "mlx.worker.x.assign"
	for _, p := range perms.PublishAllow {
		if server.SubjectMatchesFilter(refused, p) {
			t.Fatalf("PermissionsFor grants producers %q (via %q); the test needs a refused subject", refused, p)
		}
	}
	if allowed == "" || !matchesAny(allowed, perms.PublishAllow) {
		t.Fatalf("no plain bus subject among the producer's grants %v", perms.PublishAllow)
	}

	admin, err := connect(RoleAdmin, "", nil)
	if err != nil {
		t.Fatalf("admin: %v", err)
	}
	seen := make(chan string, 4)
	for _, subj := range []string{refused, allowed} {
		if _, err := admin.nc.Subscribe(subj, func(m *nats.Msg) { seen <- m.Subject }); err != nil {
			t.Fatal(err)
		}
	}
	if err := admin.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	prod, err := connect(RoleProducer, "a", nil)
	if err != nil {
		t.Fatalf("producer with its own password: %v", err)
	}
	if err := prod.nc.Publish(refused, []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	// Messages of one publisher arrive in order: the permitted one arriving first
	// proves the refused one was dropped.
	if err := prod.nc.Publish(allowed, []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	prod.violation(t, "Publish", refused)
	select {
	case subj := <-seen:
		if subj != allowed {
			t.Fatalf("admin received %s from a producer", subj)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the permitted publish to %s never arrived", allowed)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = connect(RoleProducer, "a", func(o *bus.ConnectOptions) { o.Password = "wrong" })
	if !errors.Is(err, nats.ErrAuthorization) {
		t.Fatalf("connect with a wrong password: %v, want an authorization error", err)
	}
	if nc, err := bus.Connect(ctx, bus.ConnectOptions{URLs: []string{srv.ClientURL()}, MaxReconnects: 1}); !errors.Is(err, nats.ErrAuthorization) {
		if nc != nil {
			nc.Close()
		}
		t.Fatalf("connect without credentials: %v, want an authorization error", err)
	}
}

func matchesAny(subject string, patterns []string) bool {
	for _, p := range patterns {
		if server.SubjectMatchesFilter(subject, p) {
			return true
		}
	}
	return false
}

// The cluster include carries one route credential into every route URL.
func TestNATSClusterConfCarriesRouteCredentials(t *testing.T) {
	t.Parallel()
	routes := []string{"127.0.0.1:6001", "nats-2:6222"}
	store, err := Init(InitOptions{DataDir: t.TempDir(), WorkerIDs: []string{"w1"}, BcryptCost: 4, Routes: routes})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	raw, err := os.ReadFile(store.NATSClusterConfPath())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, NATSClusterFile), raw, 0o600); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "server.conf")
	if err := os.WriteFile(conf, []byte("port: -1\ncluster {\n  name: c\n  port: -1\n  include \""+NATSClusterFile+"\"\n}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	opts, err := server.ProcessConfigFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	if opts.Cluster.Username != RouteUser || len(opts.Cluster.Password) < 20 {
		t.Fatalf("cluster authorization %q/%q", opts.Cluster.Username, opts.Cluster.Password)
	}
	if len(opts.Routes) != len(routes) {
		t.Fatalf("%d routes, want %d", len(opts.Routes), len(routes))
	}
	for i, u := range opts.Routes {
		pass, _ := u.User.Password()
		if u.Host != routes[i] || u.User.Username() != RouteUser || pass != opts.Cluster.Password {
			t.Errorf("route %d: %s, want %s with the route credentials", i, u.Redacted(), routes[i])
		}
	}
	if _, err := Init(InitOptions{DataDir: t.TempDir(), WorkerIDs: []string{"w1"}, BcryptCost: 4, Routes: []string{"user:pw@h:1"}}); err == nil {
		t.Fatal("a route with its own user info was accepted")
	}
}

// A data dir whose auth/server.json holds the grants of the release that ran
// auth init (here: every user saved with "mlx.jobs.>" alone, as a release
// before accounts gave the gateway) gets this release's grants in the
// server's configuration, and Regranted names every such user; a store this
// release wrote names none. Saved grants were used as they were: upgraded,
// the red team's data dirs ran with every JetStream call of the worker, the
// gateway and the producers refused, or refused to start (round 20, F1).
//
// Mutation caught: Load keeping the saved permissions (`u.Permissions = p`
// removed): red.
func TestLoadGrantsThisReleasesPermissions(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if _, err := Init(InitOptions{DataDir: dir, Tenants: []string{"a"}, WorkerIDs: []string{"w1"}, BcryptCost: 4}); err != nil {
		t.Fatal(err)
	}
	fresh, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if r := fresh.Regranted(); r != nil {
		t.Fatalf("a store this release wrote: regranted %v, want none", r)
	}
	users := 0
	editServerDoc(t, dir, func(doc *serverDoc) {
		for i := range doc.Users {
			doc.Users[i].Permissions = Permissions{PublishAllow: []string{"mlx.jobs.>"}, SubscribeAllow: []string{"_INBOX.>"}}
		}
		users = len(doc.Users)
	})
	store, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := len(store.Regranted()), users; got != want {
		t.Fatalf("regranted %v, want all %d users", store.Regranted(), want)
	}
	if err := store.WriteNATSAuthConf(); err != nil {
		t.Fatal(err)
	}
	opts, err := server.ProcessConfigFile(writeServerConf(t, store))
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range opts.Users {
		var id Identity
		for _, x := range store.Identities() {
			if x.User == u.Username {
				id = x
			}
		}
		p, err := PermissionsFor(id)
		if err != nil {
			t.Fatal(err)
		}
		if want := ServerUser(id.User, "", p).Permissions; !reflect.DeepEqual(u.Permissions, want) {
			t.Errorf("%s: permissions\n%s\nwant this release's\n%s", u.Username, describe(u.Permissions), describe(want))
		}
	}
}

// An auth file whose content is unchanged is not written again (same inode):
// on a full disk, `up` refused to start because it rewrote nats-auth.conf
// through a temp file at every start (red team round 21). A changed one is
// replaced.
// Mutation caught: writeFile without the unchanged check: a new inode: red.
func TestUnchangedFileNotRewritten(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f.conf")
	if err := writeFile(path, []byte("a")); err != nil {
		t.Fatal(err)
	}
	before, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := writeFile(path, []byte("a")); err != nil {
		t.Fatal(err)
	}
	if same, _ := os.Stat(path); !os.SameFile(before, same) {
		t.Fatal("unchanged content was written again")
	}
	if err := writeFile(path, []byte("b")); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(path); string(got) != "b" {
		t.Fatalf("content %q after a change, want b", got)
	}
}
