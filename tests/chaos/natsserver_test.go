package chaos

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// binaries builds nats-server (from the module cache, the version go.mod pins)
// and mlx-serving once per test process. CHAOS_BIN_DIR names a directory that
// already holds both, to replay a campaign against exactly those builds.
func binaries(t testing.TB) (natsBin, mlxBin string) {
	t.Helper()
	if dir := os.Getenv("CHAOS_BIN_DIR"); dir != "" {
		return filepath.Join(dir, "nats-server"), filepath.Join(dir, "mlx-serving")
	}
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "mlx-chaos-bin-")
		if buildErr != nil {
			return
		}
		for _, b := range [][2]string{
			{"nats-server", "github.com/nats-io/nats-server/v2"},
			{"mlx-serving", "./cmd/mlx-serving"},
		} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(binDir, b[0]), b[1])
			cmd.Dir = testenv.RepoRoot()
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("go build %s: %v\n%s", b[1], err, out)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, "nats-server"), filepath.Join(binDir, "mlx-serving")
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// natsNode is one nats-server process started from a config file in ops/nats,
// with its addresses and store dir overridden by flags (which take precedence
// over the file) so it runs on free loopback ports and a temp dir while every
// other setting — sync_interval: always above all — comes from the file
// operators deploy.
type natsNode struct {
	*proc
	port, routePort, httpPort int
	storeDir                  string
}

func (n *natsNode) url() string { return fmt.Sprintf("nats://127.0.0.1:%d", n.port) }

// natsSet is a standalone server or a cluster.
type natsSet struct {
	nodes []*natsNode
}

func (s *natsSet) urls() []string {
	var u []string
	for _, n := range s.nodes {
		u = append(u, n.url())
	}
	return u
}

func (s *natsSet) urlList() string { return strings.Join(s.urls(), ",") }

// storeDirLine is the one setting of an ops/nats file that cannot be
// overridden by a flag: nats-server refuses -sd next to a store_dir in the file.
var storeDirLine = regexp.MustCompile(`(?m)^(\s*)store_dir:.*$`)

// includeLine is an include of an ops/nats file: the files `mlx-serving auth
// init` generates (users, route credentials), read from the config's directory.
var includeLine = regexp.MustCompile(`(?m)^\s*include\s+"([^"/]+)"\s*$`)

// opsConfig copies ops/nats/<name> into runDir with store_dir pointing at
// storeDir, and returns the copy's path. Its includes get empty files: the
// campaign's clients connect without credentials, as they always have, and the
// flags' --cluster and --routes replace the routes and their credentials anyway
// (auth and the includes are tested with the files in auth and cmd/mlx-serving).
func opsConfig(t testing.TB, name, runDir, storeDir string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "ops", "nats", name))
	if err != nil {
		t.Fatal(err)
	}
	if n := len(storeDirLine.FindAll(data, -1)); n != 1 {
		t.Fatalf("ops/nats/%s: want exactly one store_dir line, found %d", name, n)
	}
	data = storeDirLine.ReplaceAll(data, []byte("${1}store_dir: "+strconv.Quote(storeDir)))
	for _, m := range includeLine.FindAllSubmatch(data, -1) {
		empty := []byte("# ops/nats include, empty for the fault campaign (see opsConfig)\n")
		if err := os.WriteFile(filepath.Join(runDir, string(m[1])), empty, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(runDir, name)
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// startStandalone runs one server from ops/nats/standalone.conf on storeDir.
func startStandalone(t testing.TB, natsBin, runDir, storeDir string) *natsSet {
	t.Helper()
	ports := freePorts(t, 2)
	n := &natsNode{port: ports[0], httpPort: ports[1], storeDir: storeDir}
	n.proc = newProc("nats", runDir, natsBin, []string{
		"-c", opsConfig(t, "standalone.conf", runDir, storeDir),
		"-a", "127.0.0.1", "-p", strconv.Itoa(n.port), "-m", strconv.Itoa(n.httpPort),
	}, nil)
	s := &natsSet{nodes: []*natsNode{n}}
	t.Cleanup(func() { n.stop(10 * time.Second) })
	if err := n.start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := n.waitHealthy(ctx); err != nil {
		t.Fatalf("nats not healthy: %v\n%s", err, n.tail(30))
	}
	return s
}

// startCluster runs three servers from ops/nats/nats-{1,2,3}.conf.
func startCluster(t testing.TB, natsBin, runDir string) *natsSet {
	t.Helper()
	ports := freePorts(t, 9)
	s := &natsSet{}
	var routes []string
	for i := range 3 {
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", ports[3*i+1]))
	}
	for i := range 3 {
		n := &natsNode{port: ports[3*i], routePort: ports[3*i+1], httpPort: ports[3*i+2],
			storeDir: filepath.Join(runDir, fmt.Sprintf("nats-%d-store", i+1))}
		n.proc = newProc(fmt.Sprintf("nats-%d", i+1), runDir, natsBin, []string{
			"-c", opsConfig(t, fmt.Sprintf("nats-%d.conf", i+1), runDir, n.storeDir),
			"-a", "127.0.0.1", "-p", strconv.Itoa(n.port), "-m", strconv.Itoa(n.httpPort),
			"--cluster", fmt.Sprintf("nats://127.0.0.1:%d", n.routePort),
			"--routes", strings.Join(routes, ","),
		}, nil)
		s.nodes = append(s.nodes, n)
		t.Cleanup(func() { n.stop(10 * time.Second) })
		if err := n.start(); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, n := range s.nodes {
		if err := n.waitHealthy(ctx); err != nil {
			t.Fatalf("%s not healthy: %v\n%s", n.name, err, n.tail(30))
		}
	}
	return s
}

// waitHealthy waits for the server's /healthz to answer 200: JetStream is
// enabled and, in a cluster, this server's streams and consumers are current.
func (n *natsNode) waitHealthy(ctx context.Context) error {
	url := fmt.Sprintf("http://127.0.0.1:%d/healthz", n.httpPort)
	client := &http.Client{Timeout: time.Second}
	err := poll(ctx, 100*time.Millisecond, func() bool {
		if !n.running() {
			return true
		}
		resp, err := client.Get(url)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	if err == nil && !n.running() {
		err = errNotRunning
	}
	return err
}

// restart starts the node again on the same store and waits until it is healthy.
func (n *natsNode) restart(ctx context.Context) error {
	if err := n.start(); err != nil {
		return err
	}
	if err := n.waitHealthy(ctx); err != nil {
		return fmt.Errorf("%s not healthy after restart: %w\n%s", n.name, err, n.tail(20))
	}
	return nil
}
