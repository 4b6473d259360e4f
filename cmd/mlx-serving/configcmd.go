package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/mlx-serving/mlx-serving/config"
)

func init() {
	register("config", "config print: show the effective configuration (flag > env > file)", cmdConfig)
}

// loadConfig registers every config flag on fs, parses args and loads the config.
func loadConfig(name string, args []string, stderr io.Writer, extra func(fs *flagSet)) (config.Config, *flag.FlagSet, int, bool) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	config.RegisterFlags(fs)
	if extra != nil {
		extra(fs)
	}
	if code, ok := parseFlags(fs, args, stderr); !ok {
		return config.Config{}, fs, code, false
	}
	c, err := config.Load(fs, os.Environ())
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving %s: %v\n", name, err)
		return c, fs, 2, false
	}
	return c, fs, 0, true
}

func cmdConfig(_ context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] != "print" {
		fmt.Fprintln(stderr, "usage: mlx-serving config print [flags]")
		return 2
	}
	c, _, code, ok := loadConfig("config print", args[1:], stderr, nil)
	if !ok {
		return code
	}
	out, err := c.YAML()
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	_, _ = stdout.Write(out)
	return 0
}

type flagSet = flag.FlagSet

const connectTimeout = 5 * time.Second
