package tests

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// binary builds cmd/mlx-serving once per test run.
func binary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "mlx-serving-bin-")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "mlx-serving")
		build := exec.Command("go", "build", "-o", binPath, "./cmd/mlx-serving")
		build.Dir = testenv.RepoRoot()
		out, err := build.CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("%v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// upProc is a running `mlx-serving up`.
type upProc struct {
	cmd      *exec.Cmd
	natsURL  string
	httpAddr string
	logs     *bytes.Buffer
	done     chan error
}

// startUp runs the real binary's `up` on free ports and a temp data dir, and waits
// for its banner.
func startUp(t *testing.T, dataDir string, extra ...string) *upProc {
	t.Helper()
	natsAddr, httpAddr := freeAddr(t), freeAddr(t)
	args := append([]string{"up", "--data-dir", dataDir, "--nats-listen", natsAddr, "--http-addr", httpAddr,
		"--model", testenv.TinyModel(t), "--python", testenv.Python(t)}, extra...)
	cmd := exec.Command(binary(t), args...)
	cmd.Dir = testenv.RepoRoot()
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &upProc{cmd: cmd, natsURL: "nats://" + natsAddr, httpAddr: httpAddr, logs: &bytes.Buffer{}, done: make(chan error, 1)}
	cmd.Stderr = &syncWriter{w: p.logs}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("up logs:\n%s", tail(p.logs.String(), 4000))
		}
	})
	banner := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		found := false
		for sc.Scan() {
			if strings.Contains(sc.Text(), "mlx-serving is up") && !found {
				found = true
				banner <- true
			}
		}
		if !found {
			banner <- false
		}
	}()
	select {
	case ok := <-banner:
		if !ok {
			t.Fatalf("up exited before its banner:\n%s", tail(p.logs.String(), 4000))
		}
	case <-time.After(3 * time.Minute):
		t.Fatalf("up not ready in time:\n%s", tail(p.logs.String(), 4000))
	}
	return p
}

type syncWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (s *syncWriter) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(b)
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// cli runs a client subcommand against p and returns stdout, stderr and exit code.
func (p *upProc) cli(t *testing.T, stdin string, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	full := append([]string{args[0], "--nats", p.natsURL}, args[1:]...)
	cmd := exec.CommandContext(ctx, binary(t), full...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

func TestCLIAgainstUp(t *testing.T) {
	up := startUp(t, t.TempDir())

	t.Run("submit streams and exits 0", func(t *testing.T) {
		out, errOut, code := up.cli(t, "", "submit", "-m", "tiny-model", "--max-tokens", "8", "hello", "there")
		if code != 0 || out == "" || !strings.Contains(errOut, "[completed") {
			t.Fatalf("code %d out %q err %q", code, out, errOut)
		}
	})

	t.Run("submit reads stdin and prints events as JSON", func(t *testing.T) {
		out, _, code := up.cli(t, "from stdin", "submit", "--json", "-m", "tiny-model", "--max-tokens", "4")
		if code != 0 {
			t.Fatalf("code %d", code)
		}
		lines := strings.Split(strings.TrimSpace(out), "\n")
		var last schemas.ResultMsg
		if err := json.Unmarshal([]byte(lines[len(lines)-1]), &last); err != nil || last.Type != "result" {
			t.Fatalf("last line not a result: %q", lines[len(lines)-1])
		}
		if len(lines) != last.Usage.CompletionTokens+1 && len(lines) < 2 {
			t.Fatalf("%d lines for %d tokens", len(lines), last.Usage.CompletionTokens)
		}
	})

	t.Run("flags after the prompt are flags, not prompt text", func(t *testing.T) {
		out, errOut, code := up.cli(t, "", "submit", "hello", "-m", "tiny-model", "--max-tokens", "3", "--json")
		lines := strings.Split(strings.TrimSpace(out), "\n")
		var last schemas.ResultMsg
		if code != 0 || json.Unmarshal([]byte(lines[len(lines)-1]), &last) != nil || last.Type != "result" {
			t.Fatalf("code %d, last line not a JSON result: out %q err %q", code, out, errOut)
		}
		if last.Usage.CompletionTokens > 3 || last.Model != "tiny-model" {
			t.Fatalf("--max-tokens 3 / -m not applied: %+v", last)
		}
	})

	// No --max-tokens: until EOS or the end of the tiny model's 2048-token
	// context (the old CLI default of 128 stopped for length at 128).
	t.Run("submit without --max-tokens runs to EOS or the context's end", func(t *testing.T) {
		out, errOut, code := up.cli(t, "", "submit", "--json", "-m", "tiny-model", "once", "upon")
		lines := strings.Split(strings.TrimSpace(out), "\n")
		var last schemas.ResultMsg
		if code != 0 || json.Unmarshal([]byte(lines[len(lines)-1]), &last) != nil || last.Type != "result" {
			t.Fatalf("code %d, last line not a JSON result: err %q", code, errOut)
		}
		if last.FinishReason == schemas.FinishLength && last.Usage.TotalTokens != 2048 {
			t.Fatalf("stopped for length at %+v, want EOS or the end of the context", last.Usage)
		}
	})

	// A model no worker serves, while one serves another: refused at once with
	// its own exit code, nothing queued. Mutation caught: dropping the check in
	// bus.Client.Submit (the job is queued, submit waits and exits 1 later).
	t.Run("submit to a model nobody serves exits 7 at once", func(t *testing.T) {
		_, errOut, code := up.cli(t, "", "submit", "--detach", "-m", "tiny-modle", "x")
		if code != 7 || !strings.Contains(errOut, "model_not_found") {
			t.Fatalf("code %d err %q, want 7 model_not_found", code, errOut)
		}
	})

	t.Run("detach then result", func(t *testing.T) {
		out, _, code := up.cli(t, "", "submit", "--detach", "-m", "tiny-model", "--max-tokens", "4", "detached")
		id := strings.TrimSpace(out)
		if code != 0 || id == "" {
			t.Fatalf("code %d out %q", code, out)
		}
		var res schemas.ResultMsg
		waitFor(t, time.Minute, func() bool {
			out, _, code := up.cli(t, "", "result", "--json", id)
			return code == 0 && json.Unmarshal([]byte(out), &res) == nil
		})
		if res.JobID != id || res.Status != schemas.StatusCompleted || res.Usage.CompletionTokens == 0 {
			t.Fatalf("result %+v", res)
		}
	})

	t.Run("a result is read under its job's tenant", func(t *testing.T) {
		out, _, code := up.cli(t, "", "submit", "--detach", "--tenant", "acme", "-m", "tiny-model", "--max-tokens", "4", "tenant")
		id := strings.TrimSpace(out)
		if code != 0 || id == "" {
			t.Fatalf("code %d out %q", code, out)
		}
		var res schemas.ResultMsg
		waitFor(t, time.Minute, func() bool {
			out, _, code := up.cli(t, "", "result", "--tenant", "acme", "--json", id)
			return code == 0 && json.Unmarshal([]byte(out), &res) == nil
		})
		if res.JobID != id || res.Tenant != "acme" || res.Status != schemas.StatusCompleted {
			t.Fatalf("result %+v", res)
		}
		if _, errOut, code := up.cli(t, "", "result", id); code == 0 || !strings.Contains(errOut, "no result yet") {
			t.Fatalf("the default tenant's lookup found tenant acme's job: code %d err %q", code, errOut)
		}
	})

	t.Run("result of an unknown job fails clearly", func(t *testing.T) {
		_, errOut, code := up.cli(t, "", "result", "no-such-job")
		if code == 0 || !strings.Contains(errOut, "no result yet") {
			t.Fatalf("code %d err %q", code, errOut)
		}
	})

	t.Run("invalid job names the path", func(t *testing.T) {
		_, errOut, code := up.cli(t, "", "submit", "-m", "tiny-model", "--temperature", "9", "x")
		if code != 2 || !strings.Contains(errOut, "$.temperature") || !strings.Contains(errOut, "invalid_request") {
			t.Fatalf("code %d err %q", code, errOut)
		}
	})

	t.Run("cancel a running job", func(t *testing.T) {
		out, _, code := up.cli(t, "", "submit", "--detach", "-m", "tiny-model", "--max-tokens", "4000", "long")
		id := strings.TrimSpace(out)
		if code != 0 {
			t.Fatalf("submit code %d", code)
		}
		if _, errOut, code := up.cli(t, "", "cancel", id); code != 0 {
			t.Fatalf("cancel code %d: %s", code, errOut)
		}
		var res schemas.ResultMsg
		waitFor(t, time.Minute, func() bool {
			out, _, code := up.cli(t, "", "result", "--json", id)
			return code == 0 && json.Unmarshal([]byte(out), &res) == nil
		})
		if res.Status != schemas.StatusCancelled {
			t.Fatalf("result %+v", res)
		}
	})

	t.Run("status shows the worker", func(t *testing.T) {
		out, _, code := up.cli(t, "", "status", "--json")
		if code != 0 {
			t.Fatalf("code %d", code)
		}
		var rep struct {
			Queued  map[string]int         `json:"queued"`
			Workers []schemas.HeartbeatMsg `json:"workers"`
		}
		if err := json.Unmarshal([]byte(out), &rep); err != nil {
			t.Fatal(err)
		}
		if len(rep.Workers) != 1 || rep.Workers[0].State != schemas.WorkerReady || len(rep.Workers[0].Models) == 0 {
			t.Fatalf("status %s", out)
		}
		if _, ok := rep.Queued["low"]; !ok {
			t.Fatalf("no per-priority depth: %s", out)
		}
		human, _, _ := up.cli(t, "", "status")
		if !strings.Contains(human, "WORKER") || !strings.Contains(human, rep.Workers[0].WorkerID) {
			t.Fatalf("table: %s", human)
		}
	})

	t.Run("a dead-lettered job is replayed", func(t *testing.T) {
		out, _, code := up.cli(t, "", "submit", "--detach", "--allow-unserved", "-m", "no-such-model", "x")
		id := strings.TrimSpace(out)
		if code != 0 {
			t.Fatalf("submit code %d", code)
		}
		waitFor(t, time.Minute, func() bool {
			out, _, _ := up.cli(t, "", "replay", "--dry-run", "--id", id)
			return strings.Contains(out, "would replay "+id)
		})
		res1, _, _ := up.cli(t, "", "result", "--json", id)
		if !strings.Contains(res1, `"failed"`) {
			t.Fatalf("dead-lettered job should have failed: %s", res1)
		}
		out, _, code = up.cli(t, "", "replay", "--id", id)
		if code != 0 || !strings.Contains(out, "replayed "+id) {
			t.Fatalf("replay code %d out %q", code, out)
		}
		// It runs again — and, with its model still missing, is dead-lettered again.
		waitFor(t, time.Minute, func() bool {
			out, _, _ := up.cli(t, "", "replay", "--dry-run", "--id", id)
			return strings.Contains(out, "would replay "+id)
		})
	})

	t.Run("version", func(t *testing.T) {
		out, err := exec.Command(binary(t), "version").Output()
		if err != nil || !strings.Contains(string(out), "mlx-serving") {
			t.Fatalf("%v out %q", err, out)
		}
	})
}
