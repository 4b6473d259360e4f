// Command mlx-serving runs every part of the system — the all-in-one `up`, the
// dispatcher, a worker, the HTTP gateway — and the client commands that submit,
// stream, cancel and inspect jobs.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
)

// Exit codes. submit's follow the job's terminal status, so scripts can branch
// on it; rootLong and the README list them all.
const (
	exitCompleted   = 0
	exitFailed      = 1
	exitUsage       = 2
	exitUnreachable = 3
	exitCancelled   = 4
	exitExpired     = 5
	exitNoResult    = 6
	exitNoModel     = 7
	exitInterrupted = 130
)

const rootLong = `mlx-serving runs every part of the system — the all-in-one up, the dispatcher,
a worker, the OpenAI-compatible gateway — and the client commands that submit,
stream, cancel and inspect jobs over NATS.

Settings come from flags, MLX_SERVING_* environment variables and a YAML file
(--config), in that order of precedence; 'mlx-serving config print' shows them.

Exit codes:
  0    success; for submit, the job completed
  1    failed: the job failed (submit), or the command could not do its work
  2    bad input: unknown command or flag, bad flag value or argument, invalid
       configuration, or a job the server refused as invalid (each offending
       JSON path is named)
  3    cannot connect to NATS at --nats: no server answered, or it refused
       the credentials (client commands, dispatcher, worker, gateway)
  4    the job was cancelled (submit)
  5    the job expired: its deadline (--timeout) passed first (submit)
  6    no result yet: the job is unknown, queued or still running (result; submit,
       when it lost its wait for an accepted job or was given a running job's --id)
  7    model_not_found: workers are up and none serves the job's model, nor
       did within the grace period; nothing was queued (submit; see
       --allow-unserved)
  130  interrupted: Ctrl-C while submit streams (the job keeps running), or a
       second Ctrl-C/SIGTERM while a server drains`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signalContext()
	defer stop()
	return execute(ctx, newRoot(stdout, stderr), args)
}

// app is what every command writes to.
type app struct {
	stdout, stderr io.Writer
}

// newRoot builds the command tree.
func newRoot(stdout, stderr io.Writer) *cobra.Command {
	a := &app{stdout: stdout, stderr: stderr}
	root := &cobra.Command{
		Use:   "mlx-serving",
		Short: "distributed MLX inference over NATS JetStream",
		Long:  rootLong,
		// Errors are printed once, by execute, with the exit code they map to.
		SilenceErrors: true,
		SilenceUsage:  true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetUsageTemplate(usageTemplate)
	root.AddGroup(
		&cobra.Group{ID: "client", Title: "Client commands (connect to NATS):"},
		&cobra.Group{ID: "server", Title: "Server commands:"},
		&cobra.Group{ID: "tools", Title: "Other commands:"},
	)
	add := func(group string, cmds ...*cobra.Command) {
		for _, c := range cmds {
			c.GroupID = group
			root.AddCommand(c)
		}
	}
	add("client", a.submitCmd(), a.resultCmd(), a.cancelCmd(), a.statusCmd(), a.replayCmd())
	add("server", a.upCmd(), a.serviceCmd("dispatcher"), a.serviceCmd("worker"), a.serviceCmd("gateway"))
	add("tools", a.configCmd(), a.authCmd(), a.benchCmd(), a.versionCmd())
	root.SetHelpCommandGroupID("tools")
	root.SetCompletionCommandGroupID("tools")
	return root
}

// exitError carries a command's exit code out of cobra.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// exitWith is nil for 0, else the error execute turns into code.
func exitWith(code int) error {
	if code == 0 {
		return nil
	}
	return exitError{code}
}

// execute runs root on args and returns the exit code: the command's own, or 2
// for anything cobra refused (unknown command or flag, bad value, wrong args).
func execute(ctx context.Context, root *cobra.Command, args []string) int {
	if len(args) == 0 {
		fmt.Fprint(root.ErrOrStderr(), root.UsageString())
		return exitUsage
	}
	root.SetArgs(oneDashLongFlags(root, args))
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return 0
	}
	var ee exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	if cmd == nil {
		cmd = root
	}
	fmt.Fprintf(root.ErrOrStderr(), "%s: %v\nRun '%s --help' for usage.\n", cmd.CommandPath(), err, cmd.CommandPath())
	return exitUsage
}

// oneDashLongFlags rewrites -name to --name where name is a long flag of the
// command args run: the standard flag package this CLI used took both, so
// scripts written for it keep working. Nothing after "--" is touched.
func oneDashLongFlags(root *cobra.Command, args []string) []string {
	cmd, _, err := root.Find(args)
	if err != nil {
		return args
	}
	out := make([]string, 0, len(args))
	for i, a := range args {
		if a == "--" {
			return append(out, args[i:]...)
		}
		if len(a) > 2 && a[0] == '-' && a[1] != '-' {
			name, _, _ := strings.Cut(a[1:], "=")
			if len(name) > 1 && (name == "help" || cmd.Flags().Lookup(name) != nil) {
				a = "-" + a
			}
		}
		out = append(out, a)
	}
	return out
}

// noArgs is cobra.NoArgs worded for a command that has no subcommands.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return fmt.Errorf("takes no arguments, got %q", args)
	}
	return nil
}

// oneJobID accepts exactly one argument, the job id.
func oneJobID(cmd *cobra.Command, args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("needs exactly one job id, got %d arguments", len(args))
	}
	return nil
}

// usageTemplate is cobra's, with a command's flags in groups: its own, then the
// connection settings (client commands) or every setting (servers).
const usageTemplate = `Usage:{{if .Runnable}}
  {{.UseLine}}{{end}}{{if .HasAvailableSubCommands}}
  {{.CommandPath}} [command]{{end}}{{if .HasExample}}

Examples:
{{.Example}}{{end}}{{if .HasAvailableSubCommands}}{{$cmds := .Commands}}{{if eq (len .Groups) 0}}

Available Commands:{{range $cmds}}{{if (or .IsAvailableCommand (eq .Name "help"))}}
  {{rpad .Name .NamePadding }} {{.Short}}{{end}}{{end}}{{else}}{{range $group := .Groups}}

{{.Title}}{{range $cmds}}{{if (and (eq .GroupID $group.ID) (or .IsAvailableCommand (eq .Name "help")))}}
  {{rpad .Name .NamePadding }} {{.Short}}{{end}}{{end}}{{end}}{{end}}{{end}}{{$own := flagGroup . ""}}{{if $own}}

Flags:
{{$own}}{{end}}{{$conn := flagGroup . "connection"}}{{if $conn}}

Connection (flag > env MLX_SERVING_* > --config file > default):
{{$conn}}{{end}}{{$set := flagGroup . "settings"}}{{if $set}}

Settings (flag > env MLX_SERVING_* > --config file > default):
{{$set}}{{end}}{{if .HasAvailableInheritedFlags}}

Global Flags:
{{.InheritedFlags.FlagUsages | trimTrailingWhitespaces}}{{end}}{{if .HasAvailableSubCommands}}

Use "{{.CommandPath}} [command] --help" for more information about a command.{{end}}
`

func init() {
	cobra.AddTemplateFunc("flagGroup", flagGroup)
}

// signalContext is cancelled on the first SIGINT/SIGTERM, which starts a graceful
// drain; a second signal exits at once, as operators expect from Ctrl-C twice.
func signalContext() (context.Context, func()) {
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan os.Signal, 2)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		select {
		case <-ch:
			cancel()
		case <-ctx.Done():
			return
		}
		<-ch
		fmt.Fprintln(os.Stderr, "mlx-serving: second signal, stopping now")
		os.Exit(exitInterrupted)
	}()
	return ctx, func() { signal.Stop(ch); cancel() }
}
