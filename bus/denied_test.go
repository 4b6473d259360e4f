package bus

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// deniedConf: an admin, and tenant a's producer, granted a's subjects only.
const deniedConf = `accounts {
  MLX {
    jetstream: enabled
    users: [
      {user: admin, password: admin}
      {user: pa, password: pa, permissions: {
        publish: {allow: ["mlx.jobs.a.>", "mlx.cancel.a.>", "$JS.API.DIRECT.GET.RESULTS.mlx.results.a.>", "_INBOX.>"]}
        subscribe: {allow: ["_INBOX.>", "mlx.reply.a.>"]}
      }}
    ]
  }
}
`

// A request the credential is not granted is ErrPermissionDenied — a submit
// or cancel when its publish times out, a read of a record when its
// direct get does, a watch at once — for another
// tenant's subjects. The server answers such a
// publish or subscribe only with an asynchronous error; the client waited out
// its timeout and said ErrUnavailable ("retry later"), and a watch with no
// deadline waited for ever (red team round 22, the bus client's F2).
// Mutation caught: published, TenantCancel, TenantResult or subscribe without deniedOn:
// ErrUnavailable after the timeout, or a watch opened: red.
func TestRequestsTheCredentialMayNotMakeAreDenied(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	conf := filepath.Join(dir, "auth.conf")
	if err := os.WriteFile(conf, []byte(deniedConf), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := startServerAt(t, filepath.Join(dir, "store"), natsserver.Options{AuthConf: conf, Account: "MLX"})
	admin, err := nats.Connect(srv.ClientURL(), nats.UserInfo("admin", "admin"))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	ajs, _ := NewJetStream(admin)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := jsprov.Provision(ctx, ajs, jsprov.Options{}); err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(srv.ClientURL(), nats.UserInfo("pa", "pa"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	// No WithTenant: its jobs go to the default tenant, which pa may not use.
	p, err := NewClient(nc, WithoutModelCheck(), WithPublishTimeout(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Submit(ctx, &schemas.JobRequest{Model: "m", Prompt: "hi"}); !errors.Is(err, ErrPermissionDenied) {
		t.Errorf("Submit outside its tenant: %v, want ErrPermissionDenied", err)
	}
	if err := p.TenantCancel(ctx, "b", "job-b", ""); !errors.Is(err, ErrPermissionDenied) {
		t.Errorf("TenantCancel of b's job: %v, want ErrPermissionDenied", err)
	}
	if _, err := p.TenantResult(ctx, "b", "job-b"); !errors.Is(err, ErrPermissionDenied) {
		t.Errorf("TenantResult of b's job: %v, want ErrPermissionDenied", err)
	}
	if _, err := Watch(context.Background(), nc, nil, "b", "job-b", ReplySubject("b", "job-b"), StreamOptions{}); !errors.Is(err, ErrPermissionDenied) {
		t.Errorf("Watch of b's job: %v, want ErrPermissionDenied", err)
	}
	pa, err := NewClient(nc, WithTenant("a"), WithoutModelCheck(), WithPublishTimeout(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pa.Submit(ctx, &schemas.JobRequest{Model: "m", Prompt: "hi"}); err != nil {
		t.Errorf("Submit in its own tenant: %v", err)
	}
	if _, err := pa.Result(ctx, "job-a"); !errors.Is(err, ErrNoResult) {
		t.Errorf("Result of its own job not finished: %v, want ErrNoResult", err)
	}
}
