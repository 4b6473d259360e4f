package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// child is one mlx-serving subcommand run as its own process, so its memory is
// its own (/proc/<pid>/status) and it costs what it costs in production.
type child struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

func startChild(exe, logDir, name string, args ...string) (*child, error) {
	logPath := filepath.Join(logDir, name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, args...)
	cmd.Stdout, cmd.Stderr = f, f
	// Own process group: the terminal's Ctrl-C reaches the bench, which stops
	// the children in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	c := &child{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { c.err = cmd.Wait(); f.Close(); close(c.done) }()
	return c, nil
}

func (c *child) pid() int { return c.cmd.Process.Pid }

// stop asks for a graceful stop (SIGTERM: drain) and kills the group after wait.
func (c *child) stop(wait time.Duration) {
	if c == nil {
		return
	}
	select {
	case <-c.done:
		return
	default:
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(wait):
		_ = syscall.Kill(-c.pid(), syscall.SIGKILL)
		<-c.done
	}
}

// tail is the end of the child's log, for error messages.
func (c *child) tail() string {
	b, _ := os.ReadFile(c.log)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-8):], "\n")
}

// rss reads VmRSS and VmHWM (peak) of a process, in bytes.
func rss(pid int) (cur, peak int64, err error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || (k != "VmRSS" && k != "VmHWM") {
			continue
		}
		fields := strings.Fields(v)
		if len(fields) == 0 {
			continue
		}
		n, _ := strconv.ParseInt(fields[0], 10, 64)
		if k == "VmRSS" {
			cur = n << 10
		} else {
			peak = n << 10
		}
	}
	return cur, peak, sc.Err()
}

// stack is the system under test: an embedded NATS server in the bench
// process, and the dispatcher, a worker and the gateway as child processes
// started from this very binary.
type stack struct {
	dir        string
	srv        *natsserver.Server
	nc         *nats.Conn
	js         jetstream.JetStream
	dispatcher *child
	worker     *child
	gateway    *child
	gatewayURL string
	workerID   string
}

type stackOptions struct {
	Exe         string
	Dir         string
	SyncAlways  bool
	JobsMaxMsgs int
	ModelDir    string
	ModelID     string
	Python      string
	Slots       int
	BatchWait   string
	BatchMax    int
	HTTPPort    int
}

func startStack(ctx context.Context, o stackOptions) (*stack, error) {
	s := &stack{dir: o.Dir, workerID: "bench-worker"}
	srv, err := natsserver.Start(ctx, natsserver.Options{
		Host: "127.0.0.1", Port: -1, StoreDir: filepath.Join(o.Dir, "jetstream"),
		SyncAlways: o.SyncAlways, ServerName: "mlx-serving-bench",
		Logger: zerolog.Nop(),
	})
	if err != nil {
		return nil, fmt.Errorf("start NATS: %w", err)
	}
	s.srv = srv
	if s.nc, err = bus.Connect(ctx, bus.ConnectOptions{URLs: []string{srv.ClientURL()}, Name: "mlx-serving-bench"}); err != nil {
		s.close()
		return nil, err
	}
	if s.js, err = jetstream.New(s.nc); err != nil {
		s.close()
		return nil, err
	}
	if err := jsprov.Provision(ctx, s.js, jsprov.Options{JobsMaxMsgs: int64(o.JobsMaxMsgs)}); err != nil {
		s.close()
		return nil, fmt.Errorf("provision: %w", err)
	}
	common := []string{"--nats", srv.ClientURL(), "--log-level", "warn", "--data-dir", o.Dir}
	if s.dispatcher, err = startChild(o.Exe, o.Dir, "dispatcher", append([]string{"dispatcher", "--batch-max-wait", o.BatchWait, "--batch-max-size", strconv.Itoa(o.BatchMax)}, common...)...); err != nil {
		s.close()
		return nil, err
	}
	if err := s.startWorker(ctx, o); err != nil {
		s.close()
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", o.HTTPPort)
	if s.gateway, err = startChild(o.Exe, o.Dir, "gateway", append([]string{"gateway", "--http-addr", addr}, common...)...); err != nil {
		s.close()
		return nil, err
	}
	s.gatewayURL = "http://" + addr
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := waitHTTP(rctx, s.gatewayURL+"/readyz"); err != nil {
		s.close()
		return nil, fmt.Errorf("gateway: %w\n%s", err, s.gateway.tail())
	}
	return s, nil
}

func (s *stack) startWorker(ctx context.Context, o stackOptions) error {
	args := []string{"worker", "--nats", s.srv.ClientURL(), "--log-level", "warn", "--data-dir", o.Dir,
		"--worker-id", s.workerID, "--model", o.ModelDir, "--slots", strconv.Itoa(o.Slots), "--python", o.Python}
	w, err := startChild(o.Exe, o.Dir, "worker", args...)
	if err != nil {
		return err
	}
	s.worker = w
	rctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	if err := s.waitWorker(rctx, o.ModelID); err != nil {
		return fmt.Errorf("worker: %w\n%s", err, w.tail())
	}
	return nil
}

// waitWorker waits until the worker's registry entry says ready with the model.
func (s *stack) waitWorker(ctx context.Context, model string) error {
	if _, _, err := registry.Get(ctx, s.js, s.workerID); errors.Is(err, registry.ErrNoRegistry) {
		return err
	}
	for {
		if hb, ok, _ := registry.Get(ctx, s.js, s.workerID); ok && hb.State == schemas.WorkerReady && slices.Contains(hb.Models, model) {
			return nil
		}
		select {
		case <-s.worker.done:
			return errors.New("worker exited")
		case <-ctx.Done():
			return fmt.Errorf("not ready: %w", ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// stopWorker drains the worker and waits until its registry entry is gone, so
// the dispatcher has no capacity left.
func (s *stack) stopWorker(ctx context.Context) {
	s.worker.stop(30 * time.Second)
	_ = registry.Delete(ctx, s.js, s.workerID)
}

func (s *stack) close() {
	s.gateway.stop(10 * time.Second)
	s.worker.stop(30 * time.Second)
	s.dispatcher.stop(10 * time.Second)
	if s.nc != nil {
		s.nc.Close()
	}
	if s.srv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = s.srv.Shutdown(ctx)
	}
}

// startBenchStack starts the system under test for the bus and gateway paths
// and the dispatcher phases, on a free loopback port for the gateway.
func startBenchStack(ctx context.Context, o *Options, dir, modelID string) (*stack, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	return startStack(ctx, stackOptions{Exe: o.Exe, Dir: dir, SyncAlways: o.SyncAlways, JobsMaxMsgs: o.JobsMaxMsgs,
		ModelDir: o.ModelDir, ModelID: modelID, Python: o.Python, Slots: o.Slots, BatchWait: o.BatchWait, BatchMax: o.BatchMax, HTTPPort: port})
}
