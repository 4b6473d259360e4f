package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/mlx-serving/mlx-serving/internal/jserr"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
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

// replayOutcome is what replaying one job did.
type replayOutcome int

const (
	replayDry          replayOutcome = iota // --dry-run: it would be replayed
	replayRequeued                          // its record purged (if still there), queued again, dead letters removed
	replayQueued                            // already in JOBS (an earlier, interrupted replay queued it); dead letters removed
	replayStale                             // RESULTS holds a newer record: it ran again; only the dead letters were removed
	replayFailed                            // a step failed; its dead letters are kept, a re-run tries again
	replayEnding                            // JOBS still holds the job (its dispatcher is ending it, or it was resubmitted): nothing done, letters kept, counted as failed
	replayPastDeadline                      // the job's deadline has passed: nothing done, record and letters kept, counted as failed
)

// replayDLQ walks the DLQ stream and replays each matching job once, from its
// newest dead letter: it clears the job's terminal record if that is still the
// record this dead letter ended, queues the job again and removes every dead
// letter of the job. each learns every job's outcome; a job that fails is
// reported there and the walk goes on. It returns how many jobs were handled and
// how many of them failed; err is for the DLQ stream itself.
//
// Every step is safe to repeat, so a replay killed at any point is finished by
// running it again (docs/RELIABILITY.md):
//   - touch nothing while JOBS holds another message for the job at any
//     priority: its dispatcher is between writing this letter, the record and
//     its ack (or the job was submitted again), and purging or queuing then
//     loses the record or the replay (stillEnding);
//   - purge only the record the dead letter names (its dead_at is the record's
//     finished_at, dispatcher/terminal.go): a different record means the job
//     already ran again, and purging it would give the job a second terminal;
//   - queue with the client's expectation of no message on the job at any
//     priority, so a job an interrupted replay already queued is not queued twice
//     (the refusal counts as done);
//   - then delete all of the job's dead letters up to the newest one read, so a
//     job never has a stale dead letter left to replay over a newer record. One
//     written after that (the job died again meanwhile) is kept.
func replayDLQ(ctx context.Context, js jetstream.JetStream, f replayFilter, dryRun, clearDeadline bool, each func(rec *schemas.DLQRecordMsg, o replayOutcome, err error)) (n, failed int, err error) {
	dlq, err := js.Stream(ctx, subjects.StreamDLQ)
	if err != nil {
		return 0, 0, err
	}
	info, err := dlq.Info(ctx)
	if err != nil {
		return 0, 0, err
	}
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		raw, err := dlq.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			return n, failed, err
		}
		var rec schemas.DLQRecordMsg
		if err := json.Unmarshal(raw.Data, &rec); err != nil {
			// Not a record replay can read: reported, kept, and the walk goes on.
			rec.Job.ID = raw.Subject[strings.LastIndexByte(raw.Subject, '.')+1:]
			if len(f.ids) == 0 || f.ids[rec.Job.ID] {
				n++
				failed++
				each(&rec, replayFailed, fmt.Errorf("DLQ seq %d: %w", seq, err))
			}
			continue
		}
		if rec.RawSubject != "" {
			// A message that was no job: kept for the record, nothing to replay.
			continue
		}
		// A job dead-lettered more than once (say replayed, and dead again) is
		// replayed from its newest dead letter only; the older ones go with it.
		last, err := dlq.GetLastMsgForSubject(ctx, raw.Subject)
		switch {
		case errors.Is(err, jetstream.ErrMsgNotFound):
			// The job's letters went since GetMsg read this one: a replay running
			// at the same time took the job (dropDeadLetters), and it is that
			// replay's to report. Not an error of this walk, which goes on.
			continue
		case err != nil:
			return n, failed, err
		case last.Sequence != seq:
			continue
		}
		if !f.match(&rec) {
			continue
		}
		n++
		if dryRun {
			if err := deadlineTooSoon(&rec.Job, clearDeadline); err != nil {
				each(&rec, replayPastDeadline, err) // it would be skipped: said, not counted failed
				continue
			}
			each(&rec, replayDry, nil)
			continue
		}
		o, err := replayJob(ctx, js, dlq, raw.Subject, seq, &rec, clearDeadline)
		if err != nil {
			failed++
			if o != replayEnding && o != replayPastDeadline {
				o = replayFailed
			}
		}
		each(&rec, o, err)
		if o == replayFailed && !jobsOwnFailure(err) && seq < info.State.LastSeq {
			// The store refused or did not answer: every later letter would
			// be purged and refused the same way, each a job left with only
			// its letter if putting its record back fails too (red team round
			// 21: replay on a full disk went on through 30 letters).
			return n, failed, fmt.Errorf("%w at %s; the dead letters after it are untouched: run replay again once JetStream takes writes (after a full disk, once the NATS server has restarted)", errReplayStopped, rec.Job.ID)
		}
	}
	return n, failed, nil
}

// replayJob replays one job from its newest dead letter rec, at seq on subject.
func replayJob(ctx context.Context, js jetstream.JetStream, dlq jetstream.Stream, subject string, seq uint64, rec *schemas.DLQRecordMsg, clearDeadline bool) (replayOutcome, error) {
	job := rec.Job
	tenant := subjects.RecordTenant(job.Tenant)
	msg, err := requeueMsg(rec, clearDeadline)
	if err != nil {
		return replayFailed, jobFailure{err}
	}
	// First, before RESULTS is read: once JOBS holds nothing for the job, its
	// dispatcher has acked it, so its record (stored before the ack) is final.
	switch held, err := jobsMsg(ctx, js, &job); {
	case err != nil:
		return replayFailed, err
	case held != nil && isMsg(held, msg):
		// An earlier replay of this letter queued it and stopped before
		// removing the letter: queued once, which is what replay is for.
		return replayQueued, dropDeadLetters(ctx, dlq, subject, seq)
	case held != nil:
		return replayEnding, stillEnding(msg)
	}
	// The leader's copy: a replica a moment behind could still show the old record.
	stored, storedSeq, err := results.StoredSeq(ctx, js, tenant, job.ID)
	switch {
	case errors.Is(err, results.ErrNoResult):
		// Purged by an earlier replay that stopped before queuing it, or
		// expired from RESULTS. Not "not yet written": JOBS held nothing for
		// the job above, so its dispatcher had acked it, after the record.
	case err != nil:
		return replayFailed, err
	default:
		var res schemas.ResultMsg
		if err := json.Unmarshal(stored, &res); err != nil {
			return replayFailed, jobFailure{fmt.Errorf("decode result %s: %w", job.ID, err)}
		}
		if !res.FinishedAt.Equal(rec.DeadAt) {
			// Not the record this dead letter ended: the job ran again (an
			// interrupted replay queued it), or another record won the race
			// with the dead-lettering one; either way the job has its one
			// terminal record, which must stay.
			return replayStale, dropDeadLetters(ctx, dlq, subject, seq)
		}
		// Only while the record is there to keep: a job an interrupted
		// replay left without it is queued whatever its deadline, so it ends
		// with a record again, expired at worst (the last review).
		if err := deadlineTooSoon(&job, clearDeadline); err != nil {
			return replayPastDeadline, err
		}
		if err := purgeResult(ctx, js, tenant, job.ID, storedSeq); err != nil {
			if err := afterPurgeError(ctx, js, tenant, job.ID, err); err != nil {
				return replayFailed, err
			}
			// Purged after all: the job is queued below.
		}
	}
	o := replayRequeued
	if _, err := js.PublishMsg(ctx, msg); err != nil {
		if !jserr.IsAlreadyStored(err) {
			err = jserr.Map(err, "requeue "+job.ID)
			if stored == nil {
				return replayFailed, err
			}
			return restoreAfterRefusal(ctx, js, dlq, subject, seq, tenant, &job, msg, stored, err)
		}
		// JOBS holds the job. If it holds this very message, an earlier replay
		// queued it and stopped before removing the dead letter: it is queued
		// once, which is what this step is for. Any other message is the job's
		// original, whose dispatcher is between writing this dead letter and the
		// record, or a resubmission: the letter is kept for a later replay to
		// judge once that run has ended.
		if err := heldByReplay(ctx, js, &job, msg); err != nil {
			if errors.Is(err, errStillEnding) {
				return replayEnding, err
			}
			return replayFailed, err
		}
		o = replayQueued
	}
	return o, dropDeadLetters(ctx, dlq, subject, seq)
}

// replayDeadlineMargin is how far ahead a job's deadline must be for replay to
// queue it with it: less, and it would likely expire waiting.
const replayDeadlineMargin = time.Minute

// deadlineTooSoon says why job is not replayed with its deadline: it has
// passed or comes within replayDeadlineMargin. Queued with it, the job ended
// expired, and its record and letter, the only copies of why it died, were
// gone (red team round 19, opstore F4; with a deadline a moment ahead too:
// the second pass).
func deadlineTooSoon(job *schemas.JobRequest, clearDeadline bool) error {
	if d := job.Deadline; d != nil && !clearDeadline && d.Before(time.Now().Add(replayDeadlineMargin)) {
		return fmt.Errorf("its deadline is %s, too soon to run it; record and dead letter kept (--clear-deadline replays it without one)", d.Format(time.RFC3339))
	}
	return nil
}

// purgeResult removes a job's record, the one stored at the sequence given
// and none newer, before its requeue (tests: a purge whose answer is lost).
var purgeResult = results.PurgeUpTo

// requeueMsg is the JOBS message that replays rec's job. The same letter always
// gives the same bytes (heldByReplay compares them).
func requeueMsg(rec *schemas.DLQRecordMsg, clearDeadline bool) (*nats.Msg, error) {
	job := rec.Job
	if clearDeadline {
		job.Deadline = nil
	}
	// Attempts go on from where they stopped, so the new attempts' records
	// are never mistaken for the old ones. rec.Attempts counts earlier
	// replays' bases too, so a job replayed again and again would number
	// past the schemas' maximum; the dispatcher clamps the base so its
	// attempts still fit (they then repeat numbers an old, purged attempt
	// had), and this keeps the value within the schema too.
	job.Metadata = maps.Clone(job.Metadata)
	if job.Metadata == nil {
		job.Metadata = map[string]string{}
	}
	job.Metadata[schemas.MetadataAttemptBase] = strconv.Itoa(min(rec.Attempts, schemas.MaxAttempt))
	data, err := json.Marshal(job)
	if err != nil {
		return nil, err
	}
	priority := job.Priority
	if priority == "" {
		priority = schemas.PriorityNormal
	}
	// No Nats-Msg-Id: the duplicate window is shared by every tenant, and any
	// producer may put any id on its own jobs, so a guessable id here would
	// let one tenant make another's replay a silent no-op. The expectation is
	// bus.Client.Submit's: nothing stored on the job at any priority.
	return &nats.Msg{Subject: subjects.Job(job.Tenant, priority, job.ID), Data: data, Header: jsprov.NewJobHeader(job.Tenant, job.ID)}, nil
}

// stillEnding is the error of a job JOBS still holds under another message
// than msg: its original, whose dispatcher has written the dead letter and is
// writing the record and acking it, or a resubmission. Run between those
// steps, replay purged the record and was then refused the requeue (the ack
// left a letter with neither record nor queued job), or queued the job just
// after the record was stored (a dispatcher then acked it unrun, as finished,
// and replay dropped the letter): red team R3-6. The letter is kept for a
// later run to judge once the job has ended.
func stillEnding(msg *nats.Msg) error {
	return fmt.Errorf("requeue %s: %w; dead letter kept: run replay again once it has ended", msg.Subject, errStillEnding)
}

var errStillEnding = errors.New("JOBS still holds the job (its dispatcher still ending it, or a resubmission)")

// jobsMsg is the message JOBS holds for job at any priority, or nil.
func jobsMsg(ctx context.Context, js jetstream.JetStream, job *schemas.JobRequest) (*jetstream.RawStreamMsg, error) {
	jobs, err := js.Stream(ctx, subjects.StreamJobs)
	if err != nil {
		return nil, err
	}
	held, err := jobs.GetLastMsgForSubject(ctx, subjects.JobAnyPriority(job.Tenant, job.ID))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("look up %s in JOBS: %w", job.ID, err)
	}
	return held, nil
}

// isMsg reports whether held is msg, replay's requeue of the same letter.
func isMsg(held *jetstream.RawStreamMsg, msg *nats.Msg) bool {
	return held.Subject == msg.Subject && bytes.Equal(held.Data, msg.Data)
}

// heldByReplay returns nil when JOBS holds msg itself for job, as an
// interrupted replay of the same dead letter left it, and an error otherwise.
func heldByReplay(ctx context.Context, js jetstream.JetStream, job *schemas.JobRequest, msg *nats.Msg) error {
	held, err := jobsMsg(ctx, js, job)
	switch {
	case err != nil:
		return fmt.Errorf("requeue %s: %w", msg.Subject, err)
	case held == nil:
		// A race of this job's alone: the walk goes on (jobFailure).
		return jobFailure{fmt.Errorf("requeue %s: refused as queued, then gone (it just ended?): run replay again", msg.Subject)}
	case !isMsg(held, msg):
		return stillEnding(msg)
	}
	return nil
}

// dropDeadLetters deletes the job's dead letters on subject up to and including
// seq, the newest one read: a job must never keep a stale one, which a later
// replay would take for its latest death.
func dropDeadLetters(ctx context.Context, dlq jetstream.Stream, subject string, seq uint64) error {
	if err := dlq.Purge(ctx, jetstream.WithPurgeSubject(subject), jetstream.WithPurgeSequence(seq+1)); err != nil {
		return fmt.Errorf("remove dead letters %s: %w", subject, err)
	}
	return nil
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
	f.BoolVar(&o.clearDeadline, "clear-deadline", false, "replay jobs without their deadline (a job whose deadline has passed or is less than a minute away is otherwise skipped, its record and dead letter kept)")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		return exitWith(a.replay(cmd.Context(), cf, o))
	}
	return cmd
}

type replayOptions struct {
	ids, since, until     string
	dryRun, clearDeadline bool
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
	n, failed, err := replayDLQ(ctx, s.js, f, o.dryRun, o.clearDeadline, func(rec *schemas.DLQRecordMsg, out replayOutcome, err error) {
		if s.json {
			line := map[string]any{"job_id": rec.Job.ID, "reason": rec.Reason, "attempts": rec.Attempts, "dead_at": rec.DeadAt, "dry_run": o.dryRun, "outcome": replayOutcomeNames[out]}
			if err != nil {
				line["error"] = err.Error()
			}
			_ = enc.Encode(line)
			return
		}
		what := fmt.Sprintf("%s after %d attempts, dead %s", rec.Reason, rec.Attempts, rec.DeadAt.Format(time.RFC3339))
		switch out {
		case replayDry:
			fmt.Fprintf(stdout, "would replay %s (%s)\n", rec.Job.ID, what)
		case replayRequeued:
			fmt.Fprintf(stdout, "replayed %s (%s)\n", rec.Job.ID, what)
		case replayQueued:
			fmt.Fprintf(stdout, "replayed %s (%s; already queued by an earlier replay)\n", rec.Job.ID, what)
		case replayStale:
			fmt.Fprintf(stdout, "skipped %s (%s): it ran again and has a newer result; stale dead letters removed\n", rec.Job.ID, what)
		default:
			fmt.Fprintf(stderr, "mlx-serving replay: %s: %v\n", rec.Job.ID, err)
		}
	})
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving replay: %v\n", err)
		return exitFailed
	}
	if !s.json {
		fmt.Fprintf(stdout, "%d job(s)\n", n)
	}
	if failed > 0 {
		fmt.Fprintf(stderr, "mlx-serving replay: %d of %d job(s) failed; run it again to finish them\n", failed, n)
		return exitFailed
	}
	return 0
}

// replayOutcomeNames name the outcomes in --json output.
var replayOutcomeNames = map[replayOutcome]string{
	replayDry: "dry_run", replayRequeued: "requeued", replayQueued: "already_queued", replayStale: "stale", replayFailed: "failed",
	replayEnding: "still_ending", replayPastDeadline: "past_deadline",
}
