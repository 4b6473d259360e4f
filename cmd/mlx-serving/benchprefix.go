package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/mlx-serving/mlx-serving/bench"
	"github.com/mlx-serving/mlx-serving/config"
)

// benchPrefixCmd is `mlx-serving bench prefix`: the prompt cache and prefix
// routing against neither, in one run.
func (a *app) benchPrefixCmd() *cobra.Command {
	var o bench.PrefixOptions
	var out string
	cmd, s := serverCmd("prefix", "multi-turn chats sharing a long system prompt over several workers: cache + prefix routing vs cache only vs neither")
	f := cmd.Flags()
	f.IntVar(&o.Workers, "workers", 2, "workers, each with its own runtime")
	f.IntVar(&o.Conversations, "conversations", 16, "conversations")
	f.IntVar(&o.Turns, "turns", 4, "user turns per conversation")
	f.IntVar(&o.Concurrency, "concurrency", 8, "conversations in flight at once")
	f.IntVar(&o.SystemWords, "system-words", 340, "words of the shared system prompt (about 1,080 tokens with the tiny tokenizer)")
	f.IntVar(&o.DocWords, "doc-words", 60, "words of each conversation's own document, in its first turn")
	f.IntVar(&o.MaxTokens, "max-tokens", 16, "completion tokens per turn")
	f.Int64Var(&o.CacheBytes, "cache-bytes", 0, "each worker's prompt cache in bytes when on (0: the runtime's default)")
	f.StringVar(&out, "out", "bench-prefix.json", "where the report goes as JSON (empty: none)")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		c, err := s.load()
		if err != nil {
			fmt.Fprintf(a.stderr, "mlx-serving bench prefix: %v\n", err)
			return exitWith(exitUsage)
		}
		if !s.changed("slots", "MLX_SERVING_SLOTS") {
			c.Slots = 0 // the bench's own default: fewer slots per worker than conversations in flight
		}
		return exitWith(runBenchPrefix(cmd.Context(), c, o, out, a.stdout, a.stderr))
	}
	return cmd
}

func runBenchPrefix(ctx context.Context, c config.Config, o bench.PrefixOptions, out string, stdout, stderr io.Writer) int {
	o.Python = pythonPath(c)
	modelDir, err := benchModel(ctx, c, o.Python)
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving bench prefix: %v\n", err)
		return exitFailed
	}
	o.ModelDir = modelDir
	if o.Exe, err = os.Executable(); err != nil {
		fmt.Fprintf(stderr, "mlx-serving bench prefix: %v\n", err)
		return exitFailed
	}
	if c.Slots > 0 {
		o.Slots = c.Slots
	}
	o.SyncAlways, o.Progress = c.SyncAlways, stderr
	r, err := bench.RunPrefix(ctx, o)
	if r != nil {
		bench.WritePrefixTable(stdout, r)
		if out != "" {
			if werr := bench.WritePrefixJSON(r, out); werr != nil {
				fmt.Fprintf(stderr, "mlx-serving bench prefix: write %s: %v\n", out, werr)
				return exitFailed
			}
			fmt.Fprintf(stdout, "\nwrote %s\n", out)
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving bench prefix: %v\n", err)
		return exitFailed
	}
	return exitCompleted
}
