// Package bench measures mlx-serving against what it is built on, in one run on
// one machine: the same model and prompts along five paths — mlx-lm in process
// (direct), the runtime over its pipe (runtime), a Go service through JetStream,
// the dispatcher and a worker (bus), OpenAI HTTP through the gateway (gateway),
// and mlx-lm's own server (mlx_lm_server) — at several concurrencies; then the
// dispatcher's ceiling against `nats bench` on the same server, and the memory
// of the real dispatcher and worker processes. `mlx-serving bench` runs it.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/nats-io/nats.go"
)

// The paths, in the order they run.
const (
	PathDirect      = "direct"
	PathRuntime     = "runtime"
	PathBus         = "bus"
	PathGateway     = "gateway"
	PathMLXLMServer = "mlx_lm_server"
)

// AllPaths is every path, in run order.
var AllPaths = []string{PathDirect, PathRuntime, PathBus, PathGateway, PathMLXLMServer}

// ErrOptions is matched by errors for bad Options.
var ErrOptions = errors.New("bench: bad options")

// Options configures Run. Zero values take the defaults noted.
type Options struct {
	Paths       []string // default AllPaths
	Concurrency []int    // default 1, 8, 32
	// Requests per concurrency level; 0: max(32, 4×concurrency).
	Requests  int
	MaxTokens int // default 64
	// ModelDir is the model every path loads (a local mlx-lm model directory).
	ModelDir string
	// Python runs the runtime, the direct path and mlx_lm.server.
	Python string
	// Exe is the mlx-serving binary the dispatcher, worker and gateway run from.
	Exe string
	// Repo is the repository root (for python/bench/direct_load.py).
	Repo string
	// Slots is the worker's slots, the runtime's --max-batch, the direct path's
	// batch and mlx_lm.server's decode/prompt concurrency (default: the highest
	// concurrency, so no path queues where another batches).
	Slots       int
	SyncAlways  bool
	JobsMaxMsgs int    // JOBS limit (default 100000)
	BatchWait   string // dispatcher --batch-max-wait (default 5ms)
	BatchMax    int    // dispatcher --batch-max-size (default 8)
	// QueuedJobs is the queue depth the dispatcher's memory is read at, with
	// Slots busy on jobs that never finish (default 100000; negative: skip).
	QueuedJobs int
	// ThroughputJobs is how many one-token jobs time the dispatcher's ceiling
	// (default 5000; negative: skip).
	ThroughputJobs int
	// NATSBenchMsgs is how many messages `nats bench` publishes and consumes
	// (default 20000; negative: skip). NATSBin is where the nats CLI is
	// installed on first use.
	NATSBenchMsgs int
	NATSBin       string
	// Rounds is how many times each concurrency level runs every path, in
	// alternating order, with the ratio targets judged on the median of the
	// per-round ratios (rounds.go). Default 1: each path runs its levels once,
	// path after path.
	Rounds int
	// Progress receives the progress bar (stderr); nil: none.
	Progress io.Writer
}

func (o *Options) defaults() error {
	if len(o.Paths) == 0 {
		o.Paths = AllPaths
	}
	for _, p := range o.Paths {
		if !contains(AllPaths, p) {
			return fmt.Errorf("%w: unknown path %q (have %s)", ErrOptions, p, strings.Join(AllPaths, ", "))
		}
	}
	if len(o.Concurrency) == 0 {
		o.Concurrency = []int{1, 8, 32}
	}
	for _, c := range o.Concurrency {
		if c < 1 {
			return fmt.Errorf("%w: concurrency %d", ErrOptions, c)
		}
	}
	if o.MaxTokens <= 0 {
		o.MaxTokens = 64
	}
	if o.ModelDir == "" {
		return fmt.Errorf("%w: ModelDir is required", ErrOptions)
	}
	if o.Slots <= 0 {
		for _, c := range o.Concurrency {
			o.Slots = max(o.Slots, c)
		}
	}
	if o.JobsMaxMsgs <= 0 {
		o.JobsMaxMsgs = 100000
	}
	if o.BatchWait == "" {
		o.BatchWait = "5ms"
	}
	if o.BatchMax <= 0 {
		o.BatchMax = 8
	}
	if o.QueuedJobs == 0 {
		o.QueuedJobs = 100000
	}
	o.QueuedJobs = min(o.QueuedJobs, o.JobsMaxMsgs)
	if o.ThroughputJobs == 0 {
		o.ThroughputJobs = 5000
	}
	if o.NATSBenchMsgs == 0 {
		o.NATSBenchMsgs = 20000
	}
	if o.Rounds == 0 {
		o.Rounds = 1
	}
	if o.Rounds < 0 {
		return fmt.Errorf("%w: rounds %d", ErrOptions, o.Rounds)
	}
	return nil
}

func contains[T comparable](xs []T, x T) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

// Machine is where the numbers were taken.
type Machine struct {
	CPU    string `json:"cpu"`
	Cores  int    `json:"cores"`
	GOOS   string `json:"goos"`
	GOARCH string `json:"goarch"`
}

// Report is one run.
type Report struct {
	Machine     Machine           `json:"machine"`
	Model       string            `json:"model"`
	MaxTokens   int               `json:"max_tokens"`
	Slots       int               `json:"slots"`
	SyncAlways  bool              `json:"sync_always"`
	Concurrency []int             `json:"concurrency"`
	Rounds      int               `json:"rounds,omitempty"` // > 1: Rows hold every round's rows (Row.Round)
	Rows        []Row             `json:"rows"`
	Throughput  *ThroughputResult `json:"dispatcher_throughput,omitempty"`
	NATSBench   *NATSBench        `json:"nats_bench,omitempty"`
	Memory      *Memory           `json:"memory,omitempty"`
	Targets     []Target          `json:"targets"`
	Seconds     float64           `json:"seconds"`
	Notes       []string          `json:"notes,omitempty"`
}

// prompts are cycled through by every path, so each sees the same work.
var prompts = []string{
	"Once upon a time, in a land far away,",
	"The quick brown fox jumps over the lazy dog. Then",
	"Write a short poem about the sea:",
	"In the beginning the universe was created. This has made a lot of people very angry and",
	"List three colors:",
	"It was a bright cold day in April, and the clocks were striking thirteen.",
	"Q: What is the capital of France?\nA:",
	"def fibonacci(n):",
}

func requestsFor(o *Options, c int) []Request {
	n := o.Requests
	if n <= 0 {
		n = max(32, 4*c)
	}
	reqs := make([]Request, n)
	for i := range reqs {
		reqs[i] = Request{Index: i, Prompt: prompts[i%len(prompts)], MaxTokens: o.MaxTokens}
	}
	return reqs
}

func machine() Machine {
	m := Machine{Cores: runtime.NumCPU(), GOOS: runtime.GOOS, GOARCH: runtime.GOARCH}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	return m
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Run runs the benchmark and writes its files; it fails only when it could not
// measure, never because a target was missed.
func Run(ctx context.Context, o Options) (*Report, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	began := time.Now()
	modelID := filepath.Base(filepath.Clean(o.ModelDir))
	r := &Report{Machine: machine(), Model: o.ModelDir, MaxTokens: o.MaxTokens, Slots: o.Slots, SyncAlways: o.SyncAlways, Concurrency: o.Concurrency}
	pb := newProgress(o.Progress)
	dir, err := os.MkdirTemp("", "mlx-serving-bench-")
	if err != nil {
		return nil, err
	}
	keepDir := false
	defer func() {
		if !keepDir {
			_ = os.RemoveAll(dir)
		}
	}()
	levels := make([][]Request, len(o.Concurrency))
	for i, c := range o.Concurrency {
		levels[i] = requestsFor(&o, c)
	}
	// Every prompt once before timing: each new prompt length compiles new
	// shapes in MLX, which would otherwise land in whichever path ran first.
	var warm []Request
	for _, p := range prompts {
		warm = append(warm, Request{Prompt: p, MaxTokens: 8})
	}

	// runPath runs the levels through d after a warm-up (JIT, connections).
	runPath := func(path string, d Driver, during func(c int)) {
		warmUp(ctx, d, warm)
		for i, c := range o.Concurrency {
			r.Rows = append(r.Rows, timeLevel(ctx, pb, path, fmt.Sprintf("%s @%d", path, c), d, levels[i], c))
			if during != nil {
				during(c)
			}
		}
	}
	failPath := func(path string, err error) {
		pb.end()
		r.Notes = append(r.Notes, fmt.Sprintf("%s: %v", path, err))
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, "bench: %s failed: %v\n", path, err)
		}
		for _, c := range o.Concurrency {
			n := len(requestsFor(&o, c))
			for k := range o.Rounds {
				r.Rows = append(r.Rows, Row{Path: path, Concurrency: c, Requests: n, Errors: n, FirstError: err.Error(), Round: roundOf(o.Rounds, k)})
			}
		}
	}
	want := func(p string) bool { return contains(o.Paths, p) }

	var st *stack
	defer func() {
		if st != nil {
			st.close()
		}
	}()
	// upStack starts NATS, the dispatcher, the worker and the gateway when a
	// path or phase needs them; when they fail, bus and gateway are failed.
	upStack := func() {
		needStack := want(PathBus) || want(PathGateway) || o.ThroughputJobs > 0 || o.QueuedJobs > 0 || o.NATSBenchMsgs > 0
		if !needStack || ctx.Err() != nil {
			return
		}
		pb.begin("starting NATS, dispatcher, worker, gateway", 1)
		s, err := startBenchStack(ctx, &o, dir, modelID)
		pb.end()
		if err != nil {
			keepDir = true
			r.Notes = append(r.Notes, fmt.Sprintf("stack: %v (logs in %s)", err, dir))
			for _, p := range []string{PathBus, PathGateway} {
				if want(p) {
					failPath(p, err)
				}
			}
			return
		}
		st = s
	}
	if o.Rounds > 1 {
		r.Rounds = o.Rounds
		upStack()
		(&roundRunner{ctx: ctx, o: &o, r: r, pb: pb, levels: levels, warm: warm, dir: dir, modelID: modelID,
			want: want, fail: failPath}).run(st)
	} else {
		if want(PathDirect) {
			pb.begin("direct (mlx-lm in process)", len(o.Concurrency))
			script := filepath.Join(o.Repo, "python", "bench", "direct_load.py")
			samples, walls, err := runDirect(ctx, o.Python, script, o.ModelDir, o.Slots, levels, o.Concurrency)
			pb.end()
			if err != nil {
				failPath(PathDirect, err)
			} else {
				for i, c := range o.Concurrency {
					r.Rows = append(r.Rows, summarize(PathDirect, c, samples[i], walls[i]))
				}
			}
		}
		if want(PathRuntime) {
			pb.begin("runtime: starting", 1)
			d, err := startRuntime(ctx, o.Python, o.ModelDir, o.Slots)
			pb.end()
			if err != nil {
				failPath(PathRuntime, err)
			} else {
				runPath(PathRuntime, d, nil)
				d.Close()
			}
		}

		upStack()
		if st != nil && want(PathBus) {
			nc, err := nats.Connect(st.srv.ClientURL(), nats.Name("mlx-serving-bench-client"))
			var d *busDriver
			if err == nil {
				d, err = newBusDriver(nc, modelID)
			}
			if err != nil {
				failPath(PathBus, err)
			} else {
				mem := &Memory{}
				r.Memory = mem
				runPath(PathBus, d, func(c int) {
					cur, peak, err := rss(st.worker.pid())
					if err == nil && c == o.Concurrency[len(o.Concurrency)-1] {
						mem.WorkerRSS, mem.WorkerPeakRSS, mem.WorkerLoad = cur, peak, c
					}
				})
				nc.Close()
			}
		}
		if st != nil && want(PathGateway) {
			runPath(PathGateway, newOpenAIDriver(st.gatewayURL, modelID, o.Slots), nil)
		}
		if want(PathMLXLMServer) && ctx.Err() == nil {
			if err := runMLXLMServer(ctx, &o, dir, func(d Driver) { runPath(PathMLXLMServer, d, nil) }); err != nil {
				failPath(PathMLXLMServer, err)
			}
		}
	}

	if st != nil && o.ThroughputJobs > 0 && ctx.Err() == nil {
		pb.begin("dispatcher ceiling (fake workers)", o.ThroughputJobs)
		// Bounded: the rate is done/elapsed either way, and the run must fit
		// its time budget on a slow dispatcher too.
		t, err := dispatchThroughput(ctx, st.srv.ClientURL(), o.ThroughputJobs, 2, 16, time.Minute, pb.step)
		pb.end()
		if err != nil {
			r.Notes = append(r.Notes, fmt.Sprintf("dispatcher throughput: %v", err))
		} else {
			r.Throughput = &t
		}
		// Jobs left over (a timed-out run) must not count against the queue
		// depth measured below.
		if s, err := st.js.Stream(ctx, subjects.StreamJobs); err == nil {
			_ = s.Purge(ctx)
		}
	}
	if st != nil && o.NATSBenchMsgs > 0 && ctx.Err() == nil {
		pb.begin("nats bench (install, pub, consume)", 1)
		bin, err := ensureNATSCLI(ctx, o.NATSBin)
		if err != nil {
			r.NATSBench = &NATSBench{Error: err.Error()}
		} else {
			r.NATSBench = runNATSBench(ctx, bin, st.srv.ClientURL(), st.js, o.NATSBenchMsgs, 512)
		}
		pb.end()
	}
	if st != nil && o.QueuedJobs > 0 && ctx.Err() == nil {
		// The real worker goes: its free slots (for another model) would let
		// the dispatcher pull more than a saturated fleet allows.
		pb.begin("stopping worker", 1)
		st.stopWorker(ctx)
		pb.end()
		pb.begin(fmt.Sprintf("saturating %d slots, queueing %d jobs", o.Slots, o.QueuedJobs), o.QueuedJobs)
		m, err := measureQueued(ctx, queueOptions{URL: st.srv.ClientURL(), JS: st.js, DispatcherPID: st.dispatcher.pid(),
			Jobs: o.QueuedJobs, Workers: 1, Slots: o.Slots, BatchMax: o.BatchMax, Progress: pb.step})
		pb.end()
		if err != nil {
			r.Notes = append(r.Notes, fmt.Sprintf("queued memory: %v", err))
		} else {
			if r.Memory != nil {
				m.WorkerRSS, m.WorkerPeakRSS, m.WorkerLoad = r.Memory.WorkerRSS, r.Memory.WorkerPeakRSS, r.Memory.WorkerLoad
			}
			r.Memory = m
		}
	}

	r.Targets = targets(r)
	r.Seconds = time.Since(began).Seconds()
	if err := ctx.Err(); err != nil {
		return r, err
	}
	return r, nil
}

// runMLXLMServer starts mlx-lm's own server on loopback with the same model
// and batch size, hands a driver to run, and stops the server.
func runMLXLMServer(ctx context.Context, o *Options, dir string, run func(Driver)) error {
	port, err := freePort()
	if err != nil {
		return err
	}
	logf, err := os.Create(filepath.Join(dir, "mlx_lm_server.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(o.Python, "-m", "mlx_lm", "server", "--model", o.ModelDir, "--host", "127.0.0.1", "--port", strconv.Itoa(port),
		"--decode-concurrency", strconv.Itoa(o.Slots), "--prompt-concurrency", strconv.Itoa(o.Slots), "--log-level", "WARNING")
	cmd.Env = append(os.Environ(), "HF_HUB_OFFLINE=1")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start mlx_lm server: %w", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	defer func() {
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	}()
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	err = waitHTTP(rctx, base+"/v1/models")
	cancel()
	if err != nil {
		b, _ := os.ReadFile(logf.Name())
		return fmt.Errorf("mlx_lm server: %w\n%s", err, tail(string(b), 8))
	}
	run(newOpenAIDriver(base, "", o.Slots))
	return nil
}
