package main

import (
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/auth"
	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

// TestResultAndCancelOfAnotherTenantSayTheyAreDenied: with tenant a's
// producer credential, `result` and `cancel` of a job of tenant b are refused
// by the server, which says so only in an asynchronous permissions violation.
// The CLI used to wait out its 5 s timeout and print "context deadline
// exceeded" (red team rt7); it must name the refusal and exit non-zero.
// Mutation caught: refusable not cancelling on the violation (the commands
// end on their timeout, the message is "context deadline exceeded").
func TestResultAndCancelOfAnotherTenantSayTheyAreDenied(t *testing.T) {
	t.Parallel()
	store, b := authBus(t)
	prod, err := store.Credential(auth.RoleProducer, "a")
	if err != nil {
		t.Fatal(err)
	}
	conn := []string{"--nats", b.Server.ClientURL(), "--nats-user", prod.User, "--nats-password", prod.Password}
	cli := func(args ...string) (int, string) {
		code, _, stderr := runReal(t, append(args, conn...)...)
		return code, stderr
	}

	// Its own tenant's jobs it may read and cancel: the credential works.
	if code, stderr := cli("result", "job-of-a"); code != exitNoResult {
		t.Fatalf("result of its own tenant's job: exit %d, %s; want %d (no result yet)", code, stderr, exitNoResult)
	}
	if code, stderr := cli("cancel", "job-of-a"); code != 0 {
		t.Fatalf("cancel of its own tenant's job: exit %d, %s", code, stderr)
	}
	for _, sc := range []struct{ cmd, verb string }{{"result", "read"}, {"cancel", "cancel"}} {
		code, stderr := cli(sc.cmd, "--tenant", "b", "job-of-b")
		want := `credential "` + prod.User + `" may not ` + sc.verb + ` the jobs of tenant "b"`
		if code != exitFailed || !strings.Contains(stderr, want) || !strings.Contains(strings.ToLower(stderr), "permissions violation") {
			t.Errorf("%s --tenant b: exit %d, stderr %q; want %d and %q with the server's violation", sc.cmd, code, stderr, exitFailed, want)
		}
	}
}

// authBus is an embedded server that accepts only the users of a fresh store
// (tenants a and b, worker w1), provisioned as admin.
func authBus(t *testing.T) (*auth.Store, *testenv.Bus) {
	t.Helper()
	store, err := auth.Init(auth.InitOptions{DataDir: t.TempDir(), Tenants: []string{"a", "b"}, WorkerIDs: []string{"w1"}, BcryptCost: 4})
	if err != nil {
		t.Fatal(err)
	}
	admin, err := store.Credential(auth.RoleAdmin, "")
	if err != nil {
		t.Fatal(err)
	}
	b := testenv.StartBusWith(t, testenv.BusOptions{
		Server:    natsserver.Options{AuthConf: store.NATSAuthConfPath()},
		Provision: jsprov.Options{WorkerTTL: 3 * time.Second},
		Connect:   bus.ConnectOptions{Name: admin.User, User: admin.User, Password: admin.Password, InboxPrefix: admin.InboxPrefix},
	})
	return store, b
}
