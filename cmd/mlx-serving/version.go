package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"runtime"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/mlx-serving/mlx-serving/worker"
)

// Set by the release build with -ldflags "-X main.version=... -X main.commit=...".
var (
	version = "dev"
	commit  = ""
)

func buildInfo() map[string]string {
	info := map[string]string{"version": version, "commit": commit, "go": runtime.Version(), "platform": runtime.GOOS + "/" + runtime.GOARCH}
	if info["commit"] == "" {
		if bi, ok := debug.ReadBuildInfo(); ok {
			for _, s := range bi.Settings {
				if s.Key == "vcs.revision" {
					info["commit"] = s.Value
				}
			}
		}
	}
	return info
}

// versionReport is what `version --json` prints.
type versionReport struct {
	Version  string `json:"version"`
	Commit   string `json:"commit"`
	Go       string `json:"go"`
	Platform string `json:"platform"`
	// Runtime is the MLX runtime's runtime.info, when one could be started.
	Runtime      *schemas.RuntimeInfo `json:"runtime,omitempty"`
	Python       string               `json:"python,omitempty"`
	RuntimeError string               `json:"runtime_error,omitempty"`
}

type versionOptions struct {
	json, noRuntime bool
	python          string
	timeout         time.Duration
}

func (a *app) versionCmd() *cobra.Command {
	var o versionOptions
	cmd := &cobra.Command{
		Use:   "version [flags]",
		Short: "print version, commit, Go version and the runtime's versions",
		Args:  noArgs,
	}
	f := cmd.Flags()
	f.BoolVar(&o.json, "json", false, "print JSON")
	f.StringVar(&o.python, "python", "", "the runtime's interpreter (default: MLX_SERVING_PYTHON, else python/.venv/bin/python, else python3)")
	f.DurationVar(&o.timeout, "runtime-timeout", 20*time.Second, "how long to wait for the runtime to answer runtime.info")
	f.BoolVar(&o.noRuntime, "no-runtime", false, "do not start the runtime to ask its versions")
	_ = cmd.MarkFlagFilename("python")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		return exitWith(printVersion(cmd.Context(), o, a.stdout))
	}
	return cmd
}

func printVersion(ctx context.Context, o versionOptions, stdout io.Writer) int {
	info := buildInfo()
	rep := versionReport{Version: info["version"], Commit: info["commit"], Go: info["go"], Platform: info["platform"]}
	if !o.noRuntime {
		rep.Python = o.python
		if rep.Python == "" {
			rep.Python = worker.DefaultPython()
		}
		rctx, cancel := context.WithTimeout(ctx, o.timeout)
		ri, err := runtimeInfo(rctx, rep.Python)
		cancel()
		if err != nil {
			rep.RuntimeError = err.Error()
		}
		rep.Runtime = ri
	}
	if o.json {
		_ = json.NewEncoder(stdout).Encode(rep)
		return 0
	}
	fmt.Fprintf(stdout, "mlx-serving %s (commit %s, %s, %s)\n", rep.Version, rep.Commit, rep.Go, rep.Platform)
	switch {
	case rep.Runtime != nil:
		r := rep.Runtime
		fmt.Fprintf(stdout, "runtime %s: mlx %s, mlx-lm %s, python %s, device %s (%s)\n",
			r.RuntimeVersion, r.MLXVersion, r.MLXLMVersion, r.PythonVersion, r.Device, rep.Python)
	case rep.RuntimeError != "":
		fmt.Fprintf(stdout, "runtime: not available with %s: %s\n", rep.Python, rep.RuntimeError)
	}
	return 0
}

// errNoInterpreter is returned when the runtime's interpreter does not exist.
var errNoInterpreter = errors.New("interpreter not found")

// runtimeInfo starts `python -m mlx_serving_runtime`, asks runtime.info, and stops
// it; everything is bounded by ctx.
func runtimeInfo(ctx context.Context, python string) (*schemas.RuntimeInfo, error) {
	if _, err := exec.LookPath(python); err != nil {
		return nil, fmt.Errorf("%w: %s", errNoInterpreter, python)
	}
	cmd := exec.Command(python, "-m", worker.RuntimeModule, "--max-batch", "1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	c, stdin, err := worker.StartRuntimeProcess(cmd, worker.RuntimeClientOptions{Logger: zerolog.Nop()})
	if err != nil {
		return nil, err
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	defer func() {
		_ = stdin.Close() // the runtime exits at EOF; the kill is for one that does not
		select {
		case <-exited:
		case <-time.After(2 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
	}()
	defer c.Close()
	info, err := c.Info(ctx)
	if err != nil {
		if errors.Is(err, worker.ErrRuntimeExited) {
			return nil, fmt.Errorf("the runtime exited before answering (is %s installed for %s?)", worker.RuntimeModule, python)
		}
		return nil, err
	}
	return info, nil
}
