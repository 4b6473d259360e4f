package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

type replayFilter struct {
	ids          map[string]bool
	since, until time.Time
}

func (f replayFilter) match(rec *schemas.DLQRecordMsg) bool {
	if len(f.ids) > 0 && !f.ids[rec.Job.ID] {
		return false
	}
	if !f.since.IsZero() && rec.DeadAt.Before(f.since) {
		return false
	}
	if !f.until.IsZero() && rec.DeadAt.After(f.until) {
		return false
	}
	return true
}

// replayDLQ walks the DLQ stream and, for each matching record, clears the job's
// terminal record, queues the job again and removes the dead letter. The job is
// republished with a message id of its own so JOBS' duplicate window, which still
// remembers the original id, does not swallow it.
func replayDLQ(ctx context.Context, js jetstream.JetStream, f replayFilter, dryRun bool, each func(rec *schemas.DLQRecordMsg)) (int, error) {
	dlq, err := js.Stream(ctx, subjects.StreamDLQ)
	if err != nil {
		return 0, err
	}
	info, err := dlq.Info(ctx)
	if err != nil {
		return 0, err
	}
	n := 0
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		raw, err := dlq.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			return n, err
		}
		var rec schemas.DLQRecordMsg
		if err := json.Unmarshal(raw.Data, &rec); err != nil {
			return n, fmt.Errorf("DLQ seq %d: %w", seq, err)
		}
		if rec.RawSubject != "" {
			// A message that was no job: kept for the record, nothing to replay.
			continue
		}
		if !f.match(&rec) {
			continue
		}
		each(&rec)
		n++
		if dryRun {
			continue
		}
		if err := results.Purge(ctx, js, subjects.RecordTenant(rec.Job.Tenant), rec.Job.ID); err != nil {
			return n, err
		}
		job := rec.Job
		// Attempts go on from where they stopped, so the new attempts' records
		// are never mistaken for the old ones. rec.Attempts counts earlier
		// replays' bases too, so a job replayed again and again would number
		// past the schemas' maximum; the dispatcher clamps the base so its
		// attempts still fit (they then repeat numbers an old, purged attempt
		// had), and this keeps the value within the schema too.
		if job.Metadata == nil {
			job.Metadata = map[string]string{}
		}
		job.Metadata[schemas.MetadataAttemptBase] = strconv.Itoa(min(rec.Attempts, schemas.MaxAttempt))
		data, err := json.Marshal(job)
		if err != nil {
			return n, err
		}
		priority := job.Priority
		if priority == "" {
			priority = schemas.PriorityNormal
		}
		// No Nats-Msg-Id: the duplicate window is shared by every tenant, and any
		// producer may put any id on its own jobs, so a guessable id here would
		// let one tenant make another's replay a silent no-op.
		if _, err := js.Publish(ctx, subjects.Job(job.Tenant, priority, job.ID), data); err != nil {
			return n, fmt.Errorf("requeue %s: %w", job.ID, err)
		}
		if err := dlq.DeleteMsg(ctx, seq); err != nil {
			return n, err
		}
	}
	return n, nil
}

func (a *app) replayCmd() *cobra.Command {
	var o replayOptions
	cmd := &cobra.Command{
		Use:   "replay [flags]",
		Short: "put dead-lettered jobs back in the queue (all, by id, or by time range)",
		Args:  noArgs,
	}
	cf := addClientFlags(cmd)
	f := cmd.Flags()
	f.StringVar(&o.ids, "id", "", "replay only these job ids, comma-separated")
	f.StringVar(&o.since, "since", "", "replay jobs dead-lettered at or after this time (RFC 3339)")
	f.StringVar(&o.until, "until", "", "replay jobs dead-lettered at or before this time (RFC 3339)")
	f.BoolVar(&o.dryRun, "dry-run", false, "list what would be replayed without doing it")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		return exitWith(a.replay(cmd.Context(), cf, o))
	}
	return cmd
}

type replayOptions struct {
	ids, since, until string
	dryRun            bool
}

func (a *app) replay(ctx context.Context, cf *clientFlags, o replayOptions) int {
	stdout, stderr := a.stdout, a.stderr
	s, code, ok := a.openClient(ctx, "replay", cf)
	if !ok {
		return code
	}
	defer s.Close()
	f := replayFilter{ids: map[string]bool{}}
	for _, id := range strings.Split(o.ids, ",") {
		if id = strings.TrimSpace(id); id != "" {
			f.ids[id] = true
		}
	}
	for _, t := range []struct {
		in  string
		out *time.Time
	}{{o.since, &f.since}, {o.until, &f.until}} {
		if t.in == "" {
			continue
		}
		v, err := time.Parse(time.RFC3339, t.in)
		if err != nil {
			fmt.Fprintf(stderr, "mlx-serving replay: %v\n", err)
			return exitUsage
		}
		*t.out = v
	}
	enc := json.NewEncoder(stdout)
	n, err := replayDLQ(ctx, s.js, f, o.dryRun, func(rec *schemas.DLQRecordMsg) {
		if s.json {
			_ = enc.Encode(map[string]any{"job_id": rec.Job.ID, "reason": rec.Reason, "attempts": rec.Attempts, "dead_at": rec.DeadAt, "dry_run": o.dryRun})
			return
		}
		verb := "replayed"
		if o.dryRun {
			verb = "would replay"
		}
		fmt.Fprintf(stdout, "%s %s (%s after %d attempts, dead %s)\n", verb, rec.Job.ID, rec.Reason, rec.Attempts, rec.DeadAt.Format(time.RFC3339))
	})
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving replay: %v\n", err)
		return exitFailed
	}
	if !s.json {
		fmt.Fprintf(stdout, "%d job(s)\n", n)
	}
	return 0
}
