package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// fleet is the mlx-serving processes of a run: dispatchers and workers, each a
// real `mlx-serving` process talking to the NATS servers of natsSet.
type fleet struct {
	t           testing.TB
	runDir      string
	mlxBin      string
	python      string
	model       string // the tiny model's directory; jobs name its base name
	nats        *natsSet
	maxAttempts int
	slots       int

	dispatchers []*proc
	workers     []*workerProc

	nc *nats.Conn // the test's control connection, listing every server
	js jetstream.JetStream
}

type workerProc struct {
	*proc
	id string
}

// modelID is what jobs name: the worker serves --model <dir> as its base name.
func (f *fleet) modelID() string { return filepath.Base(f.model) }

func newFleet(t testing.TB, runDir string, ns *natsSet, maxAttempts, slots int) *fleet {
	t.Helper()
	_, mlx := binaries(t)
	f := &fleet{t: t, runDir: runDir, mlxBin: mlx, python: testenv.Python(t), model: testenv.TinyModel(t),
		nats: ns, maxAttempts: maxAttempts, slots: slots}
	f.nc = connectAll(t, ns, "chaos-control")
	var err error
	if f.js, err = jetstream.New(f.nc); err != nil {
		t.Fatal(err)
	}
	// Processes stop before the servers (cleanups run last-in first-out).
	t.Cleanup(func() {
		for _, w := range f.workers {
			w.stop(15 * time.Second)
		}
		for _, d := range f.dispatchers {
			d.stop(15 * time.Second)
		}
	})
	return f
}

// connectAll opens a connection that lists every server of ns, closed with the test.
func connectAll(t testing.TB, ns *natsSet, name string) *nats.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	nc, err := bus.Connect(ctx, bus.ConnectOptions{URLs: ns.urls(), Name: name, ReconnectWait: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

func (f *fleet) common() []string {
	return []string{"--nats", f.nats.urlList(), "--log-level", "info"}
}

// addDispatcher starts `mlx-serving dispatcher` (which provisions the streams)
// and waits until it consumes.
func (f *fleet) addDispatcher(ctx context.Context, id string) *proc {
	f.t.Helper()
	args := append([]string{"dispatcher"}, f.common()...)
	args = append(args, "--max-attempts", strconv.Itoa(f.maxAttempts), "--data-dir", filepath.Join(f.runDir, id))
	p := newProc(id, f.runDir, f.mlxBin, args, nil)
	f.dispatchers = append(f.dispatchers, p)
	if err := f.startDispatcher(ctx, p); err != nil {
		f.t.Fatal(err)
	}
	return p
}

func (f *fleet) startDispatcher(ctx context.Context, p *proc) error {
	if err := p.start(); err != nil {
		return err
	}
	n := p.startCount()
	err := poll(ctx, 50*time.Millisecond, func() bool {
		return !p.running() || p.logContains("dispatcher running", n)
	})
	if err == nil && !p.running() {
		err = errNotRunning
	}
	if err != nil {
		return fmt.Errorf("%s not running: %w\n%s", p.name, err, p.tail(20))
	}
	return nil
}

// addWorker starts `mlx-serving worker` with its own runtime and waits until
// its heartbeat says ready.
func (f *fleet) addWorker(ctx context.Context, id string) *workerProc {
	f.t.Helper()
	args := append([]string{"worker"}, f.common()...)
	args = append(args, "--worker-id", id, "--model", f.model, "--python", f.python,
		"--slots", strconv.Itoa(f.slots), "--data-dir", filepath.Join(f.runDir, id))
	w := &workerProc{proc: newProc(id, f.runDir, f.mlxBin, args, nil), id: id}
	f.workers = append(f.workers, w)
	if err := f.startWorker(ctx, w); err != nil {
		f.t.Fatal(err)
	}
	return w
}

func (f *fleet) startWorker(ctx context.Context, w *workerProc) error {
	since := time.Now().Add(-time.Second)
	if err := w.start(); err != nil {
		return err
	}
	return f.waitWorkerReady(ctx, w, since)
}

// waitWorkerReady waits for a heartbeat of this incarnation saying ready.
func (f *fleet) waitWorkerReady(ctx context.Context, w *workerProc, since time.Time) error {
	return waitWorkerReady(ctx, f.js, w, since)
}

// waitWorkerReady waits until w's registry entry, read through js, is a
// heartbeat of the incarnation started after since saying ready.
func waitWorkerReady(ctx context.Context, js jetstream.JetStream, w *workerProc, since time.Time) error {
	var last string
	err := poll(ctx, 100*time.Millisecond, func() bool {
		if !w.running() {
			return true
		}
		kv, err := js.KeyValue(ctx, subjects.BucketWorkers)
		if err != nil {
			last = err.Error()
			return false
		}
		e, err := kv.Get(ctx, w.id)
		if err != nil {
			last = err.Error()
			return false
		}
		var hb schemas.HeartbeatMsg
		if err := json.Unmarshal(e.Value(), &hb); err != nil {
			last = err.Error()
			return false
		}
		last = hb.State
		return hb.State == schemas.WorkerReady && hb.StartedAt.After(since)
	})
	if err == nil && !w.running() {
		err = errNotRunning
	}
	if err != nil {
		return fmt.Errorf("worker %s not ready (last: %s): %w\n%s", w.id, last, err, w.tail(20))
	}
	return nil
}

// runtimePID finds the worker's Python runtime among its children.
func (w *workerProc) runtimePID() int {
	pid := w.pid()
	if pid == 0 {
		return 0
	}
	for _, c := range children(pid) {
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", c))
		if strings.Contains(string(cmdline), "mlx_serving_runtime") && alive(c) {
			return c
		}
	}
	return 0
}

// dumpLogs prints the tail of every process log, for a failed run.
func (f *fleet) dumpLogs(lines int) {
	f.t.Helper()
	for _, p := range f.dispatchers {
		f.t.Logf("--- %s (%s)\n%s", p.name, p.logPath, p.tail(lines))
	}
	for _, w := range f.workers {
		f.t.Logf("--- %s (%s)\n%s", w.name, w.logPath, w.tail(lines))
	}
	for _, n := range f.nats.nodes {
		f.t.Logf("--- %s (%s)\n%s", n.name, n.logPath, n.tail(lines))
	}
}
