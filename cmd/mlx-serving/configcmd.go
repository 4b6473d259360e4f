package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

func (a *app) configCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "config",
		Short: "config print: show the effective configuration (flag > env > file)",
		Args:  cobra.NoArgs,
		RunE:  a.needsSubcommand,
	}
	print, s := serverCmd("print", "print the effective configuration as YAML (flag > env > file > default), secrets masked")
	print.RunE = func(*cobra.Command, []string) error {
		c, err := s.load()
		if err != nil {
			fmt.Fprintf(a.stderr, "mlx-serving config print: %v\n", err)
			return exitWith(exitUsage)
		}
		out, err := c.YAML()
		if err != nil {
			fmt.Fprintln(a.stderr, err)
			return exitWith(exitFailed)
		}
		_, _ = a.stdout.Write(out)
		return nil
	}
	cmd.AddCommand(print)
	return cmd
}

// needsSubcommand is the run of a command that only groups others: its usage,
// on stderr, and exit 2.
func (a *app) needsSubcommand(cmd *cobra.Command, _ []string) error {
	fmt.Fprint(a.stderr, cmd.UsageString())
	return exitWith(exitUsage)
}
