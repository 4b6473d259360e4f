package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/mlx-serving/mlx-serving/bench"
	"github.com/mlx-serving/mlx-serving/config"
	"github.com/mlx-serving/mlx-serving/worker"
)

type benchOptions struct {
	paths, conc, out, natsBin                     string
	requests, maxTokens, queued, tpJobs, natsMsgs int
	rounds                                        int
}

func (a *app) benchCmd() *cobra.Command {
	var o benchOptions
	cmd, s := serverCmd("bench", "benchmark the same model along direct, runtime, bus, gateway and mlx_lm_server; dispatcher ceiling and memory")
	f := cmd.Flags()
	f.StringVar(&o.paths, "paths", strings.Join(bench.AllPaths, ","), "paths to run, comma-separated: "+strings.Join(bench.AllPaths, ", "))
	f.StringVar(&o.conc, "concurrency", "1,8,32", "concurrency levels, comma-separated")
	f.IntVar(&o.requests, "requests", 0, "requests per concurrency level (0: max(32, 4×concurrency))")
	f.IntVar(&o.maxTokens, "max-tokens", 64, "completion tokens per request")
	f.StringVar(&o.out, "out", "bench.json", "where the rows go as JSON; the full report and the SVG plot go beside it (NAME.summary.json, NAME.svg); empty: no files")
	f.IntVar(&o.queued, "queued-jobs", 100000, "queue depth the dispatcher's memory is read at (negative: skip)")
	f.IntVar(&o.tpJobs, "throughput-jobs", 5000, "one-token jobs that time the dispatcher's ceiling (negative: skip)")
	f.IntVar(&o.natsMsgs, "nats-bench-msgs", 20000, "messages for `nats bench` js pub/consume (negative: skip)")
	f.IntVar(&o.rounds, "rounds", 1, "run each concurrency level N times over the selected paths, the order reversed every other round so load drift "+
		"hits both sides of a ratio; each A-vs-B target is computed within each round and judged on the median of the rounds (every round's value shown); "+
		"the table shows per-level medians, bench.json every round's rows with \"round\"; processes stay up across rounds (direct: one script run per "+
		"level and round); jobs/s and memory targets are unaffected. 1: each path runs its levels once, path after path")
	f.StringVar(&o.natsBin, "nats-bin", defaultNATSBin(), "where the nats CLI is installed (go install) on first use")
	_ = cmd.MarkFlagFilename("out", "json")
	_ = cmd.MarkFlagDirname("nats-bin")
	cmd.AddCommand(a.benchPrefixCmd())
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		c, err := s.load()
		if err != nil {
			fmt.Fprintf(a.stderr, "mlx-serving bench: %v\n", err)
			return exitWith(exitUsage)
		}
		// The highest concurrency, unless the operator chose the slots.
		slots := 0
		if s.changed("slots", "MLX_SERVING_SLOTS") {
			slots = c.Slots
		}
		return exitWith(runBench(cmd.Context(), c, slots, o, a.stdout, a.stderr))
	}
	return cmd
}

func runBench(ctx context.Context, c config.Config, slots int, o benchOptions, stdout, stderr io.Writer) int {
	levels, err := parseLevels(o.conc)
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving bench: --concurrency: %v\n", err)
		return 2
	}
	python := pythonPath(c)
	modelDir, err := benchModel(ctx, c, python)
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving bench: %v\n", err)
		return 1
	}
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving bench: %v\n", err)
		return 1
	}
	repo, err := repoRoot()
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving bench: %v\n", err)
		return 1
	}
	r, err := bench.Run(ctx, bench.Options{
		Paths: benchList(o.paths), Concurrency: levels, Requests: o.requests, MaxTokens: o.maxTokens,
		ModelDir: modelDir, Python: python, Exe: exe, Repo: repo, Slots: slots,
		SyncAlways: c.SyncAlways, JobsMaxMsgs: int(c.JobsMaxMsgs), BatchWait: c.BatchWait().String(), BatchMax: c.BatchMaxSize,
		QueuedJobs: o.queued, ThroughputJobs: o.tpJobs, NATSBenchMsgs: o.natsMsgs, NATSBin: o.natsBin,
		Rounds: o.rounds, Progress: stderr,
	})
	if r != nil {
		bench.WriteTable(stdout, r)
		if o.out != "" {
			summary, svg, werr := bench.WriteFiles(r, o.out)
			if werr != nil {
				fmt.Fprintf(stderr, "mlx-serving bench: write %s: %v\n", o.out, werr)
				return 1
			}
			fmt.Fprintf(stdout, "\nwrote %s, %s, %s\n", o.out, summary, svg)
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving bench: %v\n", err)
		if errors.Is(err, bench.ErrOptions) {
			return 2
		}
		return 1
	}
	return 0
}

// benchModel is the model directory every path loads: the configured one, else
// the tiny model (MLX_SERVING_TINY_MODEL when it exists, else written into the
// data dir like `up` does).
func benchModel(ctx context.Context, c config.Config, python string) (string, error) {
	if c.Model == "" {
		if dir := os.Getenv("MLX_SERVING_TINY_MODEL"); dir != "" {
			if _, err := os.Stat(filepath.Join(dir, "config.json")); err == nil {
				return filepath.Abs(dir)
			}
		}
	}
	specs, _, err := modelSpec(ctx, c, python, zerolog.New(os.Stderr).With().Timestamp().Logger())
	if err != nil {
		return "", err
	}
	dir := worker.ParseModelSpec(specs[0]).Path
	if _, err := os.Stat(filepath.Join(dir, "config.json")); err != nil {
		return "", fmt.Errorf("model %s: not a local model directory (the bench loads it in several processes): %w", dir, err)
	}
	return filepath.Abs(dir)
}

// repoRoot is the nearest directory upward holding python/bench/direct_load.py.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "python", "bench", "direct_load.py")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("run the bench inside the repository: python/bench/direct_load.py not found upward")
		}
		dir = parent
	}
}

func defaultNATSBin() string {
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "mlx-serving", "bench-bin")
	}
	return filepath.Join(os.TempDir(), "mlx-serving-bench-bin")
}

func benchList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func parseLevels(s string) ([]int, error) {
	var out []int
	for _, p := range benchList(s) {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("bad level %q", p)
		}
		out = append(out, n)
	}
	return out, nil
}
