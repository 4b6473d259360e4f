package worker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/internal/breaker"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// ErrRuntimeUnavailable is returned when a job needs the runtime and it is not up.
var ErrRuntimeUnavailable = errors.New("worker: runtime unavailable")

// RuntimeModule is what the supervisor runs with `python -m`.
const RuntimeModule = "mlx_serving_runtime"

// ModelSpec is one model to preload: the runtime loads Path under ID.
type ModelSpec struct {
	ID   string
	Path string
}

// ParseModelSpec reads "id=path" or a bare path, whose id is its base name.
func ParseModelSpec(s string) ModelSpec {
	if id, path, ok := strings.Cut(s, "="); ok && id != "" && path != "" {
		return ModelSpec{ID: id, Path: path}
	}
	return ModelSpec{ID: filepath.Base(filepath.Clean(s)), Path: s}
}

// DefaultPython is the interpreter used when none is configured: MLX_SERVING_PYTHON,
// else python/.venv/bin/python in the working directory or the nearest parent that
// has one, else python3 on PATH.
func DefaultPython() string {
	if p := os.Getenv("MLX_SERVING_PYTHON"); p != "" {
		return p
	}
	if dir, err := os.Getwd(); err == nil {
		for {
			cand := filepath.Join(dir, "python", ".venv", "bin", "python")
			if _, err := os.Stat(cand); err == nil {
				return cand
			}
			parent := filepath.Dir(dir)
			if parent == dir {
				break
			}
			dir = parent
		}
	}
	return "python3"
}

type supervisorOptions struct {
	Python         string
	ExtraArgs      []string
	Env            []string
	MaxBatch       int
	Models         []ModelSpec
	StartTimeout   time.Duration
	LoadTimeout    time.Duration
	HealthInterval time.Duration
	HealthTimeout  time.Duration
	StopTimeout    time.Duration
	BackoffInitial time.Duration
	BackoffMax     time.Duration
	Breaker        breaker.Options
	Cooldown       time.Duration
	Logger         zerolog.Logger
	// OnUp and OnDown tell the agent when the runtime became usable or stopped being.
	OnUp   func()
	OnDown func()
	// Observer is told about starts and losses; nil: nobody.
	Observer Observer
}

// process is one run of the runtime.
type process struct {
	cmd     *exec.Cmd
	client  *RuntimeClient
	exited  chan struct{}
	exitErr error
}

func (p *process) pid() int { return p.cmd.Process.Pid }

// kill ends the whole process group, so anything the runtime spawned goes too.
func (p *process) kill() {
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	_ = p.cmd.Process.Kill()
}

// supervisor keeps one runtime process alive: start, check, preload, health-check,
// and on a crash or failed health check kill it and restart with exponential
// backoff, behind the circuit breaker.
type supervisor struct {
	opts    supervisorOptions
	log     zerolog.Logger
	breaker *breaker.Breaker

	mu       sync.Mutex
	cur      *process // nil while the runtime is not up
	models   []string
	memory   int64
	info     *schemas.RuntimeInfo
	stopping bool

	cancel context.CancelFunc
	done   chan struct{}
}

func newSupervisor(opts supervisorOptions) *supervisor {
	if opts.Observer == nil {
		opts.Observer = nopObserver{}
	}
	return &supervisor{opts: opts, log: opts.Logger, breaker: breaker.New(opts.Breaker), done: make(chan struct{})}
}

func (s *supervisor) start(ctx context.Context) {
	ctx, s.cancel = context.WithCancel(ctx)
	go func() {
		defer close(s.done)
		s.run(ctx)
	}()
}

// client is the runtime's client while it is up, else nil.
func (s *supervisor) client() *RuntimeClient {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil {
		return nil
	}
	return s.cur.client
}

// pid of the running runtime, 0 when none.
func (s *supervisor) pid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil {
		return 0
	}
	return s.cur.pid()
}

func (s *supervisor) loaded() ([]string, int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil {
		return nil, s.memory
	}
	return append([]string(nil), s.models...), s.memory
}

func (s *supervisor) hasModel(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil {
		return false
	}
	for _, m := range s.models {
		if m == id {
			return true
		}
	}
	return false
}

func (s *supervisor) run(ctx context.Context) {
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = s.opts.BackoffInitial
	bo.MaxInterval = s.opts.BackoffMax
	bo.MaxElapsedTime = 0 // a worker never gives up on its runtime; the breaker paces it
	bo.Reset()
	for ctx.Err() == nil {
		if s.breaker.State() == breaker.Open {
			s.log.Error().Dur("cooldown", s.opts.Cooldown).Msg("runtime circuit breaker open")
			if !sleepCtx(ctx, s.opts.Cooldown) {
				return
			}
			if _, err := s.breaker.Fire(breaker.Cooldown, time.Now()); err != nil {
				s.log.Error().Err(err).Msg("breaker")
			}
		}
		p, err := s.boot(ctx)
		if err != nil {
			if ctx.Err() != nil || s.isStopping() {
				return
			}
			if s.opts.OnDown != nil {
				s.opts.OnDown()
			}
			s.opts.Observer.RuntimeStart(false)
			st := s.breaker.Record(false, time.Now())
			s.log.Error().Err(err).Stringer("breaker", st).Msg("runtime failed to start")
			if st == breaker.Open {
				continue
			}
			if !sleepCtx(ctx, bo.NextBackOff()) {
				return
			}
			continue
		}
		s.opts.Observer.RuntimeStart(true)
		s.breaker.Record(true, time.Now())
		bo.Reset()
		reason := s.watch(ctx, p)
		s.down(p)
		if ctx.Err() != nil || s.isStopping() {
			return
		}
		s.opts.Observer.RuntimeLost()
		st := s.breaker.Record(false, time.Now())
		s.log.Error().Err(reason).Stringer("breaker", st).Msg("runtime lost; restarting")
		if st == breaker.Open {
			continue
		}
		if !sleepCtx(ctx, bo.NextBackOff()) {
			return
		}
	}
}

func (s *supervisor) isStopping() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stopping
}

// spawn starts the process with its three pipes. The parent keeps only its own
// ends, so EOF on stdout means every holder of the child's end is gone.
func (s *supervisor) spawn() (*process, error) {
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		outR.Close()
		outW.Close()
		return nil, err
	}
	args := append([]string{"-m", RuntimeModule, "--max-batch", strconv.Itoa(s.opts.MaxBatch)}, s.opts.ExtraArgs...)
	cmd := exec.Command(s.opts.Python, args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, errW
	cmd.Env = append(os.Environ(), s.opts.Env...)
	// Its own process group: a terminal's Ctrl-C reaches only the worker, which
	// decides how the runtime stops, and kill() can take the whole group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err = cmd.Start()
	inR.Close()
	outW.Close()
	errW.Close()
	if err != nil {
		inW.Close()
		outR.Close()
		errR.Close()
		return nil, fmt.Errorf("start %s: %w", s.opts.Python, err)
	}
	p := &process{cmd: cmd, exited: make(chan struct{})}
	log := s.log.With().Int("runtime_pid", cmd.Process.Pid).Logger()
	p.client = NewRuntimeClient(outR, inW, RuntimeClientOptions{Logger: log})
	go func() {
		<-p.client.Done()
		outR.Close()
	}()
	go func() {
		defer errR.Close()
		sc := bufio.NewScanner(errR)
		sc.Buffer(make([]byte, 4<<10), 1<<20) // grows for a long line (a traceback), up to 1 MiB
		for sc.Scan() {
			log.Info().Str("stream", "stderr").Msg(sc.Text())
		}
	}()
	go func() {
		p.exitErr = cmd.Wait()
		close(p.exited)
		// The last lines may still sit in the pipe: let the reader reach EOF on its
		// own, and close the client only if something else keeps stdout open.
		select {
		case <-p.client.Done():
		case <-time.After(2 * time.Second):
			p.kill()
			p.client.Close()
		}
	}()
	log.Info().Str("python", s.opts.Python).Msg("runtime started")
	return p, nil
}

// boot starts a runtime and runs the checks a start (and a half-open probe) must
// pass: runtime.info, every model load, one health check.
func (s *supervisor) boot(ctx context.Context) (*process, error) {
	p, err := s.spawn()
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*process, error) {
		p.kill()
		p.client.Close()
		return nil, err
	}
	ictx, cancel := context.WithTimeout(ctx, s.opts.StartTimeout)
	info, err := p.client.Info(ictx)
	cancel()
	if err != nil {
		return fail(fmt.Errorf("runtime.info: %w", err))
	}
	var models []string
	for _, m := range s.opts.Models {
		lctx, cancel := context.WithTimeout(ctx, s.opts.LoadTimeout)
		res, err := p.client.LoadModel(lctx, schemas.ModelLoadParams{Model: m.Path, ID: m.ID})
		cancel()
		if err != nil {
			return fail(fmt.Errorf("model.load %s: %w", m.Path, err))
		}
		models = append(models, res.ID)
		s.log.Info().Str("model", res.ID).Str("path", res.Path).Float64("load_ms", res.LoadTimeMs).Msg("model loaded")
	}
	hctx, cancel := context.WithTimeout(ctx, s.opts.HealthTimeout)
	h, err := p.client.Health(hctx)
	cancel()
	if err != nil {
		return fail(fmt.Errorf("health: %w", err))
	}
	if !h.OK {
		return fail(errors.New("health: runtime says not ok"))
	}
	s.mu.Lock()
	s.cur, s.models, s.info, s.memory = p, models, info, info.Memory.TotalBytes
	s.mu.Unlock()
	if s.opts.OnUp != nil {
		s.opts.OnUp()
	}
	s.log.Info().Str("device", info.Device).Str("mlx", info.MLXVersion).Strs("models", models).Msg("runtime ready")
	return p, nil
}

// watch returns why the runtime stopped being usable.
func (s *supervisor) watch(ctx context.Context, p *process) error {
	t := time.NewTicker(s.opts.HealthInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-p.exited:
			return fmt.Errorf("runtime exited: %v", p.exitErr)
		case <-p.client.Done():
			return p.client.Err()
		case <-t.C:
			hctx, cancel := context.WithTimeout(ctx, s.opts.HealthTimeout)
			h, err := p.client.Health(hctx)
			cancel()
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if err != nil {
				return fmt.Errorf("health check: %w", err)
			}
			if !h.OK {
				return errors.New("health check: runtime says not ok")
			}
		}
	}
}

// down takes a runtime out of service: its in-flight calls fail with
// ErrRuntimeExited, which is how running jobs learn of the crash.
func (s *supervisor) down(p *process) {
	s.mu.Lock()
	if s.cur == p {
		s.cur = nil
	}
	s.mu.Unlock()
	if s.opts.OnDown != nil {
		s.opts.OnDown()
	}
	p.kill()
	select {
	case <-p.client.Done():
	case <-time.After(2 * time.Second):
		p.client.Close()
	}
}

// stop asks the runtime to shut down (mode drain or cancel), waits for it to exit
// within StopTimeout or ctx, kills it otherwise, and ends supervision.
func (s *supervisor) stop(ctx context.Context, mode string) {
	s.mu.Lock()
	s.stopping = true
	p := s.cur
	s.mu.Unlock()
	if p != nil {
		sctx, cancel := context.WithTimeout(ctx, s.opts.StopTimeout)
		if _, err := p.client.Shutdown(sctx, mode); err != nil {
			s.log.Warn().Err(err).Msg("runtime shutdown request failed; killing it")
		} else {
			select {
			case <-p.exited:
			case <-sctx.Done():
				s.log.Warn().Msg("runtime did not exit after shutdown; killing it")
			}
		}
		cancel()
		p.kill()
	}
	s.cancel()
	select {
	case <-s.done:
	case <-ctx.Done():
	}
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
