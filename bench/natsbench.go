package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
)

// natscliModule is what `go install` builds for the bus ceiling; pinned so runs
// compare.
const natscliModule = "github.com/nats-io/natscli/nats@v0.5.1"

// NATSBench is `nats bench` against the bench's own server (same store
// directory, same sync setting).
type NATSBench struct {
	Version string  `json:"version"`
	Msgs    int     `json:"msgs"`
	Size    int     `json:"size_bytes"`
	PubPerS float64 `json:"js_pub_async_msgs_per_s"`
	SubPerS float64 `json:"js_consume_msgs_per_s"`
	Error   string  `json:"error,omitempty"`
}

// Ceiling is the rate a job's own JetStream traffic can at best reach: the
// slower of publishing and consuming.
func (n *NATSBench) Ceiling() float64 {
	if n == nil || n.Error != "" {
		return 0
	}
	return min(n.PubPerS, n.SubPerS)
}

// ensureNATSCLI returns the nats CLI, installed with `go install` into binDir on
// first use.
func ensureNATSCLI(ctx context.Context, binDir string) (string, error) {
	bin := filepath.Join(binDir, "nats")
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, "go", "install", natscliModule)
	cmd.Env = append(os.Environ(), "GOBIN="+binDir)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go install %s: %w\n%s", natscliModule, err, tail(out.String(), 10))
	}
	return bin, nil
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

var rateRE = regexp.MustCompile(`([0-9][0-9,]*) msgs/sec`)

// runNATSBench publishes msgs messages of size bytes asynchronously into a file
// stream, then consumes them with a durable consumer, and removes the stream.
func runNATSBench(ctx context.Context, bin, url string, js jetstream.JetStream, msgs, size int) *NATSBench {
	r := &NATSBench{Version: strings.TrimPrefix(natscliModule, "github.com/nats-io/natscli/"), Msgs: msgs, Size: size}
	const stream = "mlxbench"
	run := func(args ...string) (float64, error) {
		base := []string{"--server", url, "--no-context", "bench"}
		cmd := exec.CommandContext(ctx, bin, append(base, args...)...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			return 0, fmt.Errorf("nats bench %s: %w\n%s", strings.Join(args, " "), err, tail(out.String(), 10))
		}
		m := rateRE.FindStringSubmatch(out.String())
		if m == nil {
			return 0, fmt.Errorf("nats bench %s: no msgs/sec in output:\n%s", strings.Join(args, " "), tail(out.String(), 10))
		}
		return strconv.ParseFloat(strings.ReplaceAll(m[1], ",", ""), 64)
	}
	n, sz := strconv.Itoa(msgs), strconv.Itoa(size)
	defer func() { _ = js.DeleteStream(context.WithoutCancel(ctx), stream) }()
	var err error
	if r.PubPerS, err = run("js", "pub", "async", "mlxbench.subj", "--stream", stream, "--create", "--purge", "--storage", "file",
		"--msgs", n, "--size", sz, "--no-progress"); err != nil {
		r.Error = err.Error()
		return r
	}
	if r.SubPerS, err = run("js", "consume", "--stream", stream, "--msgs", n, "--no-progress"); err != nil {
		r.Error = err.Error()
	}
	if r.Error == "" && (r.PubPerS == 0 || r.SubPerS == 0) {
		r.Error = errors.New("nats bench reported a zero rate").Error()
	}
	return r
}
