package main

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

type statusReport struct {
	Queued   map[string]uint64      `json:"queued"`
	InFlight int                    `json:"in_flight"`
	DLQ      uint64                 `json:"dlq"`
	Results  uint64                 `json:"results"`
	Workers  []schemas.HeartbeatMsg `json:"workers"`
	// StoreBytes is what this account's streams hold on the JetStream
	// store; Streams, how full each bounded stream is.
	StoreBytes uint64       `json:"store_bytes"`
	Streams    []streamFill `json:"streams"`
	// Stale lists the workers whose entry is older than the registry's TTL:
	// it should have expired, so the store is not applying its limits (a
	// store refusing writes: the operator round's full disk, where status
	// showed such a worker ready).
	Stale []string `json:"stale_workers,omitempty"`
}

// staleWorkers are those of workers whose entry the server stored more than
// ttl before now (the server's time, not the worker's updated_at: a worker's
// clock may be skewed).
func staleWorkers(entries []registry.Entry, ttl time.Duration, now time.Time) []string {
	var out []string
	for _, e := range entries {
		if ttl > 0 && now.Sub(e.StoredAt) > ttl {
			out = append(out, e.Heartbeat.WorkerID)
		}
	}
	return out
}

// streamFill is a bounded stream's state against its limits (-1: none).
type streamFill struct {
	Name     string `json:"name"`
	Msgs     uint64 `json:"msgs"`
	MaxMsgs  int64  `json:"max_msgs"`
	Bytes    uint64 `json:"bytes"`
	MaxBytes int64  `json:"max_bytes"`
}

// fillWarnings says which streams are at 90% or more of a limit, and what an
// operator sees then: a full stream refuses what is written to it (discard-new).
func fillWarnings(fills []streamFill) []string {
	consequence := map[string]string{
		subjects.StreamJobs:    "submits are refused with queue_full",
		subjects.StreamDLQ:     "new dead letters are refused (their jobs still get their records; they cannot be replayed)",
		subjects.StreamCancels: "cancels are refused",
		subjects.StreamLedger:  "attempts are numbered from delivery counts alone",
	}
	var out []string
	for _, f := range fills {
		for _, l := range []struct {
			what      string
			have, max float64
		}{{"messages", float64(f.Msgs), float64(f.MaxMsgs)}, {"bytes", float64(f.Bytes), float64(f.MaxBytes)}} {
			if l.max <= 0 || l.have < 0.9*l.max {
				continue
			}
			pct := 100 * l.have / l.max
			w := fmt.Sprintf("%s is at %.0f%% of its %s limit", f.Name, pct, l.what)
			if l.have >= l.max {
				w += ": " + consequence[f.Name]
			}
			out = append(out, w)
		}
	}
	return out
}

func gatherStatus(ctx context.Context, js jetstream.JetStream) (statusReport, error) {
	rep := statusReport{Queued: map[string]uint64{}}
	for _, p := range schemas.Priorities {
		rep.Queued[p] = 0
	}
	q, err := jsprov.QueueDepths(ctx, js)
	if err != nil {
		return rep, err
	}
	for p, n := range q {
		rep.Queued[p] += n
	}
	if dlq, err := js.Stream(ctx, subjects.StreamDLQ); err == nil {
		if i, err := dlq.Info(ctx); err == nil {
			rep.DLQ = i.State.Msgs
		}
	}
	if res, err := js.Stream(ctx, subjects.StreamResults); err == nil {
		if i, err := res.Info(ctx); err == nil {
			rep.Results = i.State.Msgs
		}
	}
	for _, name := range []string{subjects.StreamJobs, subjects.StreamDLQ, subjects.StreamCancels, subjects.StreamLedger} {
		if s, err := js.Stream(ctx, name); err == nil {
			if i, err := s.Info(ctx); err == nil {
				rep.Streams = append(rep.Streams, streamFill{Name: name, Msgs: i.State.Msgs, MaxMsgs: i.Config.MaxMsgs, Bytes: i.State.Bytes, MaxBytes: i.Config.MaxBytes})
			}
		}
	}
	if ai, err := js.AccountInfo(ctx); err == nil {
		rep.StoreBytes = ai.Store
	}
	// A missing registry is an error: the bus was not provisioned.
	entries, err := registry.Entries(ctx, js)
	if err != nil {
		return rep, err
	}
	workers := make([]schemas.HeartbeatMsg, len(entries))
	for i, e := range entries {
		workers[i] = e.Heartbeat
	}
	rep.Workers = workers // sorted by worker id
	if kv, err := js.KeyValue(ctx, subjects.BucketWorkers); err == nil {
		if st, err := kv.Status(ctx); err == nil {
			rep.Stale = staleWorkers(entries, st.TTL(), time.Now())
		}
	}
	for _, hb := range workers {
		rep.InFlight += hb.InFlight
	}
	return rep, nil
}

func (a *app) statusCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status [flags]",
		Short: "queue depth per priority, in flight, DLQ size and the workers",
		Args:  noArgs,
	}
	cf := addClientFlags(cmd)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		return exitWith(a.status(cmd.Context(), cf))
	}
	return cmd
}

func (a *app) status(ctx context.Context, cf *clientFlags) int {
	stdout, stderr := a.stdout, a.stderr
	s, code, ok := a.openClient(ctx, "status", cf)
	if !ok {
		return code
	}
	defer s.Close()
	rep, err := gatherStatus(ctx, s.js)
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving status: %v\n", err)
		return exitFailed
	}
	if s.json {
		_ = json.NewEncoder(stdout).Encode(rep)
		return 0
	}
	queued := make([]string, 0, len(schemas.Priorities))
	for _, p := range schemas.Priorities {
		queued = append(queued, fmt.Sprintf("%s %d", p, rep.Queued[p]))
	}
	fmt.Fprintf(stdout, "queued:    %s\n", strings.Join(queued, " · "))
	fmt.Fprintf(stdout, "in flight: %d\nDLQ:       %d\nresults:   %d\nstore:     %.1f MiB held by the streams\n", rep.InFlight, rep.DLQ, rep.Results, float64(rep.StoreBytes)/(1<<20))
	for _, w := range fillWarnings(rep.Streams) {
		fmt.Fprintf(stdout, "warning:   %s\n", w)
	}
	if len(rep.Stale) > 0 {
		fmt.Fprintf(stdout, "warning:   heartbeats older than the registry's TTL (%s): their entries should have expired; the JetStream store may be refusing writes (a full disk): check the NATS server's log\n",
			printable(strings.Join(rep.Stale, ", ")))
	}
	if len(rep.Workers) == 0 {
		// What a full JetStream store looks like from here too: heartbeats
		// cannot be written, and every worker's entry expires.
		fmt.Fprintln(stdout, "warning:   no worker heart-beats: jobs wait in JOBS (if workers are running, check their logs for failed heartbeat puts: a full JetStream store refuses them)")
	}
	fmt.Fprintln(stdout)
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "WORKER\tSTATE\tMODELS\tSLOTS\tIN FLIGHT\tLAST HEARTBEAT")
	for _, w := range rep.Workers {
		state := string(w.State)
		if slices.Contains(rep.Stale, w.WorkerID) {
			state = "stale (" + state + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s ago\n", printable(w.WorkerID), printable(state), printable(strings.Join(w.Models, ",")), w.Slots, w.InFlight,
			time.Since(w.UpdatedAt).Round(100*time.Millisecond))
	}
	if len(rep.Workers) == 0 {
		fmt.Fprintln(tw, "(none)\t\t\t\t\t")
	}
	_ = tw.Flush()
	return 0
}

// printable replaces control characters in what a worker wrote into its
// heartbeat before it reaches an operator's terminal: the schemas allow them
// in model names, and a worker credential's escape sequences would otherwise
// retitle, recolour or (on some terminals) write the clipboard of whoever runs
// status (the red team's L-2).
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return '?'
		}
		return r
	}, s)
}
