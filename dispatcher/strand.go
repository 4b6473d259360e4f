package dispatcher

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Stranded jobs: JOBS messages a consumer acked that the stream kept.
//
// On a work-queue stream an ack removes the message. With the store's disk
// full, nats-server recorded the acks in the consumer but could not delete
// the messages, and the write error stayed until it restarted (operator
// round 2: 72 jobs, each with its one record, left in JOBS below the
// consumer's ack floor). Such a message is never delivered again, yet it
// counts as queued (status, the queue-depth metric) and keeps its job id from
// being submitted again. sweepStranded removes those whose job has its record
// — acked means done, and the record is the proof — and leaves any other,
// logged: a job is never removed without its record.

// strandSweepEvery is how often a dispatcher looks for stranded messages
// (also once at start). A look costs a consumer info, a stream info and one
// message get per priority when nothing is stranded.
const strandSweepEvery = 5 * time.Minute

// strandSweepMax bounds the messages one look handles per priority.
const strandSweepMax = 1000

func (d *Dispatcher) strandLoop(ctx context.Context) {
	t := time.NewTicker(strandSweepEvery)
	defer t.Stop()
	for {
		for p := range schemas.NumPriorities {
			d.sweepStranded(ctx, d.consumers[p], subjects.JobsPriority(schemas.Priorities[p]))
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sweepStranded deletes the messages of JOBS on filter at or below cons's
// ack floor whose job has its record, and returns how many it deleted.
func (d *Dispatcher) sweepStranded(ctx context.Context, cons jetstream.Consumer, filter string) int {
	ci, err := cons.Info(ctx)
	if err != nil {
		return 0
	}
	floor := ci.AckFloor.Stream
	si, err := d.jobsStream.Info(ctx)
	if err != nil || floor == 0 || si.State.FirstSeq > floor {
		return 0 // the usual case: nothing at or below the floor is left
	}
	deleted := 0
	seq := si.State.FirstSeq
	for range strandSweepMax {
		m, err := d.jobsStream.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(filter))
		if err != nil || m.Sequence > floor {
			break // none left at or below the floor (ErrMsgNotFound), or the store failed: next look
		}
		seq = m.Sequence + 1
		ref, _, ok := subjects.ParseJob(m.Subject)
		if !ok {
			continue
		}
		if _, err := results.Stored(ctx, d.js, ref.Tenant, ref.ID); err != nil {
			if errors.Is(err, bus.ErrNoResult) {
				d.rare.Warn().Str("job_id", ref.ID).Str("tenant", ref.Tenant).Uint64("seq", m.Sequence).Uint64("ack_floor", floor).
					Msg("a JOBS message below its consumer's ack floor has no record: left in place for an operator")
			}
			continue
		}
		if err := d.jobsStream.DeleteMsg(ctx, m.Sequence); err == nil {
			deleted++
			d.count().strandedRemoved()
		}
	}
	if deleted > 0 {
		d.log.Warn().Int("messages", deleted).Str("filter", filter).Uint64("ack_floor", floor).
			Msg("removed jobs left in JOBS after their ack (their records are stored): the store failed to delete them")
	}
	return deleted
}
