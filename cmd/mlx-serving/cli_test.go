package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// parsed is what a command line parsed into, caught before anything connects.
type parsed struct {
	path  string
	args  []string
	flags *pflag.FlagSet
}

// parseOnly runs args through the real command tree with every command's run
// replaced by one that records what cobra handed it.
func parseOnly(t *testing.T, args ...string) (p *parsed, code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	root := newRoot(&out, &errb)
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		if c.Runnable() {
			c.RunE = func(cmd *cobra.Command, args []string) error {
				p = &parsed{path: cmd.CommandPath(), args: args, flags: cmd.Flags()}
				return nil
			}
		}
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
	code = execute(context.Background(), root, args)
	return p, code, out.String(), errb.String()
}

// runReal runs args through the real commands (for those that need no server).
func runReal(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = execute(context.Background(), newRoot(&out, &errb), args)
	return code, out.String(), errb.String()
}

func flagString(t *testing.T, fs *pflag.FlagSet, name string) string {
	t.Helper()
	f := fs.Lookup(name)
	if f == nil {
		t.Fatalf("no flag --%s", name)
	}
	return f.Value.String()
}

// Mutation caught: with cmd.Flags().SetInterspersed(false) in submitCmd, the
// first two cases went red — "submit hello -m tiny2 --max-tokens 3 --json" ran
// with args [hello -m tiny2 --max-tokens 3 --json], --model "tiny",
// --max-tokens 128, --json false: the old hand-written layer's bug. Restored.
func TestCLIParsesCommandLines(t *testing.T) {
	for _, tc := range []struct {
		name  string
		line  []string
		path  string
		args  []string
		flags map[string]string
	}{
		{
			name: "flags after the prompt are flags",
			line: []string{"submit", "hello", "-m", "tiny2", "--max-tokens", "3", "--json"},
			path: "mlx-serving submit", args: []string{"hello"},
			flags: map[string]string{"model": "tiny2", "max-tokens": "3", "json": "true"},
		},
		{
			name: "flags between the prompt's words",
			line: []string{"submit", "tell", "--priority", "high", "me", "--timeout", "30s", "a", "story"},
			path: "mlx-serving submit", args: []string{"tell", "me", "a", "story"},
			flags: map[string]string{"priority": "high", "timeout": "30s"},
		},
		{
			name: "everything after -- is prompt",
			line: []string{"submit", "--json", "--", "-m", "is", "a", "flag"},
			path: "mlx-serving submit", args: []string{"-m", "is", "a", "flag"},
			flags: map[string]string{"json": "true", "model": "tiny"},
		},
		{
			name: "result ID --json",
			line: []string{"result", "01JOBID", "--json"},
			path: "mlx-serving result", args: []string{"01JOBID"},
			flags: map[string]string{"json": "true"},
		},
		{
			name: "cancel keeps --tenant",
			line: []string{"cancel", "01JOBID", "--tenant", "acme", "--reason", "no longer needed"},
			path: "mlx-serving cancel", args: []string{"01JOBID"},
			flags: map[string]string{"tenant": "acme", "reason": "no longer needed"},
		},
		{
			name: "connection flags anywhere",
			line: []string{"status", "--json", "--nats", "nats://10.0.0.1:4222", "--nats-user", "admin"},
			path: "mlx-serving status", args: []string{},
			flags: map[string]string{"json": "true", "nats": "nats://10.0.0.1:4222", "nats-user": "admin"},
		},
		{
			name: "one-dash long flags, as the standard flag package took them",
			line: []string{"submit", "-json", "-max-tokens=4", "hi"},
			path: "mlx-serving submit", args: []string{"hi"},
			flags: map[string]string{"json": "true", "max-tokens": "4"},
		},
		{
			name: "server settings are typed",
			line: []string{"up", "--slots", "2", "--sync-always=false", "--worker-ttl", "30s", "--jobs-max-msgs", "500"},
			path: "mlx-serving up", args: []string{},
			flags: map[string]string{"slots": "2", "sync-always": "false", "worker-ttl": "30s", "jobs-max-msgs": "500"},
		},
		{
			name: "a number setting is typed",
			line: []string{"dispatcher", "--route-max-skew", "0.25", "--routing", "least_loaded"},
			path: "mlx-serving dispatcher", args: []string{},
			flags: map[string]string{"route-max-skew": "0.25", "routing": "least_loaded"},
		},
		{
			name: "subcommands of subcommands",
			line: []string{"auth", "init", "--tenants", "a,b", "--data-dir", "/tmp/x", "--force"},
			path: "mlx-serving auth init", args: []string{},
			flags: map[string]string{"tenants": "a,b", "data-dir": "/tmp/x", "force": "true"},
		},
		{
			name: "replay",
			line: []string{"replay", "--dry-run", "--id", "a,b"},
			path: "mlx-serving replay", args: []string{},
			flags: map[string]string{"dry-run": "true", "id": "a,b"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, code, _, stderr := parseOnly(t, tc.line...)
			if code != 0 || p == nil {
				t.Fatalf("exit %d, stderr %q", code, stderr)
			}
			if p.path != tc.path || !slices.Equal(p.args, tc.args) {
				t.Errorf("ran %q with args %q, want %q with %q", p.path, p.args, tc.path, tc.args)
			}
			for name, want := range tc.flags {
				if got := flagString(t, p.flags, name); got != want {
					t.Errorf("--%s = %q, want %q", name, got, want)
				}
			}
		})
	}
}

func TestCLIRefusesBadLinesWithExit2(t *testing.T) {
	for _, tc := range []struct {
		line []string
		want string
	}{
		{[]string{"submit", "hello", "--bogus"}, "mlx-serving submit: unknown flag: --bogus"},
		{[]string{"status", "--data-dir", "x"}, "unknown flag: --data-dir"}, // a server setting
		{[]string{"submit", "--max-tokens", "many", "hi"}, `invalid argument "many" for "--max-tokens"`},
		{[]string{"up", "--slots", "eight"}, `invalid argument "eight" for "--slots"`},
		{[]string{"up", "--worker-ttl", "10"}, `invalid argument "10" for "--worker-ttl"`},
		{[]string{"up", "--route-max-skew", "half"}, `invalid argument "half" for "--route-max-skew"`},
		{[]string{"result"}, "needs exactly one job id"},
		{[]string{"cancel", "a", "b"}, "needs exactly one job id"},
		{[]string{"status", "extra"}, "takes no arguments"},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"config", "show"}, `unknown command "show"`},
		{[]string{}, "Usage:"},
	} {
		t.Run(strings.Join(tc.line, " "), func(t *testing.T) {
			// Real runs: each is refused before anything connects.
			code, _, stderr := runReal(t, tc.line...)
			if code != exitUsage || !strings.Contains(stderr, tc.want) {
				t.Fatalf("exit %d (want 2), stderr %q, want it to say %q", code, stderr, tc.want)
			}
		})
	}
}

func TestCLIHelpShowsEachCommandsOwnFlags(t *testing.T) {
	code, out, _ := runReal(t, "status", "-h")
	if code != 0 {
		t.Fatalf("status -h: exit %d", code)
	}
	for _, want := range []string{"--json", "--nats ", "--nats-user", "--config"} {
		if !strings.Contains(out, want) {
			t.Errorf("status -h lacks %s:\n%s", want, out)
		}
	}
	for _, server := range []string{"--data-dir", "--slots", "--log-level", "--auth-tokens", "--tenant-rate", "--nats-listen", "--sync-always"} {
		if strings.Contains(out, server) {
			t.Errorf("status -h shows server setting %s:\n%s", server, out)
		}
	}

	_, out, _ = runReal(t, "up", "--help")
	var line string
	for l := range strings.Lines(out) {
		if strings.Contains(l, "--log-level") {
			line = l
		}
	}
	if !strings.Contains(line, "log level: trace, debug, info, warn or error") || !strings.Contains(line, "MLX_SERVING_LOG_LEVEL") ||
		strings.Contains(line, "token") {
		t.Errorf("--log-level help: %q", line)
	}
	for _, typed := range []string{"--slots int", "--worker-ttl duration", "--batch-max-wait duration", "--jobs-max-msgs int"} {
		if !strings.Contains(out, typed) {
			t.Errorf("up --help lacks %q", typed)
		}
	}
	if strings.Contains(out, "--json") || strings.Contains(out, "--max-tokens") {
		t.Errorf("up --help shows client flags:\n%s", out)
	}

	_, out, _ = runReal(t, "--help")
	for _, code := range []string{"0 ", "1 ", "2 ", "3 ", "4 ", "5 ", "6 ", "130 "} {
		if !strings.Contains(out, "\n  "+code) {
			t.Errorf("--help does not document exit code %s", code)
		}
	}
}

func TestCLICompletion(t *testing.T) {
	for _, shell := range []string{"bash", "zsh", "fish"} {
		code, out, stderr := runReal(t, "completion", shell)
		if code != 0 || !strings.Contains(out, "mlx-serving") {
			t.Errorf("completion %s: exit %d, %d bytes, %s", shell, code, len(out), stderr)
		}
	}
	_, out, _ := runReal(t, cobra.ShellCompRequestCmd, "submit", "hi", "--priority", "")
	if !strings.Contains(out, "high") || !strings.Contains(out, "low") {
		t.Errorf("--priority completes to %q", out)
	}
}

// The settings keep config's precedence: flag > env > file > default.
func TestCLISettingsPrecedence(t *testing.T) {
	file := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(file, []byte("slots: 3\nbatch_max_wait: 9ms\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	slots := func(args ...string) string {
		t.Helper()
		code, out, stderr := runReal(t, append([]string{"config", "print"}, args...)...)
		if code != 0 {
			t.Fatalf("config print %q: exit %d: %s", args, code, stderr)
		}
		for l := range strings.Lines(out) {
			if v, ok := strings.CutPrefix(strings.TrimSpace(l), "slots: "); ok {
				return v
			}
		}
		t.Fatalf("no slots in %s", out)
		return ""
	}
	t.Setenv("MLX_SERVING_CONFIG", "")
	t.Setenv("MLX_SERVING_SLOTS", "")
	os.Unsetenv("MLX_SERVING_SLOTS")
	if got := slots(); got != "8" {
		t.Errorf("default: slots %s", got)
	}
	if got := slots("--config", file); got != "3" {
		t.Errorf("file: slots %s", got)
	}
	t.Setenv("MLX_SERVING_SLOTS", "5")
	if got := slots("--config", file); got != "5" {
		t.Errorf("env over file: slots %s", got)
	}
	if got := slots("--config", file, "--slots", "2"); got != "2" {
		t.Errorf("flag over env: slots %s", got)
	}
	t.Setenv("MLX_SERVING_CONFIG", file)
	os.Unsetenv("MLX_SERVING_SLOTS")
	if got := slots(); got != "3" {
		t.Errorf("file from MLX_SERVING_CONFIG: slots %s", got)
	}
	// A duration flag reaches the schema in its own form (90s, not 1m30s).
	code, out, stderr := runReal(t, "config", "print", "--batch-max-wait", "1m30s")
	if code != 0 || !strings.Contains(out, "batch_max_wait: 90s") {
		t.Errorf("exit %d: %s%s", code, out, stderr)
	}
}

// TestDispatcherStopSettings: dispatcher_drain_timeout and
// dispatcher_write_grace reach dispatcher.Config from the dispatcher command's
// typed flags and the environment, and unset keep the dispatcher's defaults.
// Mutation caught: dropping WriteGrace from dispatcherConfig (the dispatcher
// then takes its own 10s whatever the flag says).
func TestDispatcherStopSettings(t *testing.T) {
	t.Setenv("MLX_SERVING_CONFIG", "")
	stop := func(env string, args ...string) (drain, grace time.Duration) {
		t.Helper()
		t.Setenv("MLX_SERVING_DISPATCHER_DRAIN_TIMEOUT", env)
		if env == "" {
			os.Unsetenv("MLX_SERVING_DISPATCHER_DRAIN_TIMEOUT")
		}
		p, code, _, stderr := parseOnly(t, append([]string{"dispatcher"}, args...)...)
		if code != 0 || p == nil {
			t.Fatalf("dispatcher %q: exit %d: %s", args, code, stderr)
		}
		c, err := (&settings{fs: p.flags}).load()
		if err != nil {
			t.Fatalf("load %q: %v", args, err)
		}
		dc := dispatcherConfig(c, nil, nil, nil)
		return dc.DrainTimeout, dc.WriteGrace
	}
	if d, g := stop(""); d != 30*time.Second || g != 10*time.Second {
		t.Errorf("defaults: drain %v, write grace %v", d, g)
	}
	if d, g := stop("45s", "--dispatcher-write-grace", "1m30s"); d != 45*time.Second || g != 90*time.Second {
		t.Errorf("env drain 45s, flag grace 1m30s: got %v, %v", d, g)
	}
	if d, _ := stop("45s", "--dispatcher-drain-timeout", "2m"); d != 2*time.Minute {
		t.Errorf("flag over env: drain %v", d)
	}
}
