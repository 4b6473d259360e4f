package chaos

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/auth"
	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

// authStack is the single-node stack with bus authentication on, as an
// operator deploys it: `mlx-serving auth init` writes every role's credential
// and nats-auth.conf; nats-server runs ops/nats/standalone.conf with that
// include; the dispatcher and each worker connect with their own credential
// (MLX_SERVING_NATS_USER/PASSWORD, as a service unit would set them).
type authStack struct {
	t           testing.TB
	runDir      string
	mlxBin      string
	model       string
	store       *auth.Store
	nats        *natsSet
	disp        *proc
	metricsPort int
	workers     map[string]*workerProc

	admin   *nats.Conn // the test's control connection, as admin
	adminJS jetstream.JetStream
}

func (s *authStack) modelID() string { return filepath.Base(s.model) }

// startAuthStack runs auth init for tenants and workerIDs, nats-server with the
// generated users, one dispatcher and the workers (slots each, real runtime).
func startAuthStack(t testing.TB, ctx context.Context, runDir string, tenants, workerIDs []string, slots int) *authStack {
	t.Helper()
	natsBin, mlxBin := binaries(t)
	s := &authStack{t: t, runDir: runDir, mlxBin: mlxBin, model: testenv.TinyModel(t), workers: map[string]*workerProc{}}
	python := testenv.Python(t)

	authDir := filepath.Join(runDir, "authdata")
	out, err := exec.CommandContext(ctx, mlxBin, "auth", "init", "--data-dir", authDir,
		"--tenants", strings.Join(tenants, ","), "--workers", strings.Join(workerIDs, ",")).CombinedOutput()
	if err != nil {
		t.Fatalf("auth init: %v\n%s", err, out)
	}
	if s.store, err = auth.Load(authDir); err != nil {
		t.Fatal(err)
	}

	// ops/nats/standalone.conf as deployed: its include is the generated file.
	storeDir := filepath.Join(runDir, "nats-store")
	conf := opsConfig(t, "standalone.conf", runDir, storeDir)
	gen, err := os.ReadFile(s.store.NATSAuthConfPath())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(runDir, auth.NATSAuthFile), gen, 0o600); err != nil {
		t.Fatal(err)
	}
	ports := freePorts(t, 3)
	n := &natsNode{port: ports[0], httpPort: ports[1], storeDir: storeDir}
	n.proc = newProc("nats", runDir, natsBin, []string{"-c", conf,
		"-a", "127.0.0.1", "-p", strconv.Itoa(n.port), "-m", strconv.Itoa(n.httpPort)}, nil)
	s.nats = &natsSet{nodes: []*natsNode{n}}
	t.Cleanup(func() { n.stop(10 * time.Second) })
	if err := n.start(); err != nil {
		t.Fatal(err)
	}
	if err := n.waitHealthy(ctx); err != nil {
		t.Fatalf("nats not healthy: %v\n%s", err, n.tail(30))
	}

	s.admin = s.connect(auth.RoleAdmin, "").nc
	if s.adminJS, err = jetstream.New(s.admin); err != nil {
		t.Fatal(err)
	}

	// Processes stop before the server (cleanups run last-in first-out).
	t.Cleanup(func() {
		for _, w := range s.workers {
			w.stop(15 * time.Second)
		}
		if s.disp != nil {
			s.disp.stop(15 * time.Second)
		}
	})
	s.metricsPort = ports[2]
	args := []string{"dispatcher", "--nats", s.nats.urlList(), "--log-level", "info", "--max-attempts", "3",
		"--data-dir", filepath.Join(runDir, "d1"), "--metrics-addr", fmt.Sprintf("127.0.0.1:%d", s.metricsPort)}
	s.disp = newProc("d1", runDir, mlxBin, args, s.credEnv(auth.RoleDispatcher, ""))
	if err := s.disp.start(); err != nil {
		t.Fatal(err)
	}
	if err := poll(ctx, 50*time.Millisecond, func() bool {
		return !s.disp.running() || s.disp.logContains("dispatcher running", 1)
	}); err != nil || !s.disp.running() {
		t.Fatalf("dispatcher not running: %v\n%s", err, s.disp.tail(30))
	}

	var wg sync.WaitGroup
	errs := make([]error, len(workerIDs))
	for i, id := range workerIDs {
		args := []string{"worker", "--nats", s.nats.urlList(), "--log-level", "info", "--worker-id", id,
			"--model", s.model, "--python", python, "--slots", strconv.Itoa(slots), "--data-dir", filepath.Join(runDir, id)}
		w := &workerProc{proc: newProc(id, runDir, mlxBin, args, s.credEnv(auth.RoleWorker, id)), id: id}
		s.workers[id] = w
		since := time.Now().Add(-time.Second)
		if err := w.start(); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = s.waitWorkerReady(ctx, w, since) }()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	return s
}

// credEnv is the environment that makes a `mlx-serving` process connect as
// role's generated credential.
func (s *authStack) credEnv(role auth.Role, name string) []string {
	s.t.Helper()
	c, err := s.store.Credential(role, name)
	if err != nil {
		s.t.Fatal(err)
	}
	return []string{"MLX_SERVING_NATS_USER=" + c.User, "MLX_SERVING_NATS_PASSWORD=" + c.Password}
}

func (s *authStack) waitWorkerReady(ctx context.Context, w *workerProc, since time.Time) error {
	return waitWorkerReady(ctx, s.adminJS, w, since)
}

// dispatcherID is the running dispatcher's id (`mlx-serving dispatcher` names
// itself <hostname>-<pid>): the last token of the done subjects it serves.
func (s *authStack) dispatcherID() string {
	host, _ := os.Hostname()
	return fmt.Sprintf("%s-%d", host, s.disp.pid())
}

// metric reads one unlabelled sample from the dispatcher's /metrics.
func (s *authStack) metric(name string) (float64, error) {
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", s.metricsPort))
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == name {
			return strconv.ParseFloat(f[1], 64)
		}
	}
	return 0, fmt.Errorf("metric %s not exposed", name)
}

func (s *authStack) dumpLogs(lines int) {
	s.t.Helper()
	for _, p := range []*proc{s.disp, s.workers["w1"].proc, s.workers["w2"].proc, s.nats.nodes[0].proc} {
		if p != nil {
			s.t.Logf("--- %s (%s)\n%s", p.name, p.logPath, p.tail(lines))
		}
	}
}

// client is one test connection as a role's credential, recording the async
// errors the server sends it (permission violations above all).
type busClient struct {
	name string
	nc   *nats.Conn
	js   jetstream.JetStream

	mu   sync.Mutex
	errs []error
}

func (s *authStack) connect(role auth.Role, name string) *busClient {
	s.t.Helper()
	c, err := s.store.Credential(role, name)
	if err != nil {
		s.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	nc, err := bus.Connect(ctx, bus.ConnectOptions{URLs: s.nats.urls(), Name: "attack-" + c.User, User: c.User,
		Password: c.Password, InboxPrefix: c.InboxPrefix, ReconnectWait: 100 * time.Millisecond})
	if err != nil {
		s.t.Fatalf("connect as %s: %v", c.User, err)
	}
	s.t.Cleanup(nc.Close)
	cl := &busClient{name: c.User, nc: nc}
	nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		cl.mu.Lock()
		cl.errs = append(cl.errs, err)
		cl.mu.Unlock()
	})
	if cl.js, err = bus.NewJetStream(nc); err != nil {
		s.t.Fatal(err)
	}
	return cl
}

// violation waits up to wait for the server's permission violation of kind
// ("Publish" or "Subscription") naming subject, after a flush made the server
// process everything sent before. It consumes the error it found.
func (c *busClient) violation(kind, subject string, wait time.Duration) bool {
	_ = c.nc.FlushTimeout(5 * time.Second)
	deadline := time.Now().Add(wait)
	for {
		c.mu.Lock()
		for i, err := range c.errs {
			if errors.Is(err, nats.ErrPermissionViolation) && strings.Contains(err.Error(), kind) &&
				strings.Contains(err.Error(), strconv.Quote(subject)) {
				c.errs = append(c.errs[:i], c.errs[i+1:]...)
				c.mu.Unlock()
				return true
			}
		}
		c.mu.Unlock()
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
}
