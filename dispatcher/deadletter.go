package dispatcher

import (
	"context"
	"encoding/json"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jserr"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// storeDeadLetter stores dlq, the dead letter of the job res ends, before res
// itself is written (writeTerminal). The record is the job's durable answer;
// the letter is the copy `replay` works from. So a letter the DLQ refuses for
// good is dropped, counted (AnomalyDeadLetterRefused) and logged, and nil
// returned: the record is written all the same. "For good" is the DLQ full
// (discard-new at jsprov's DLQMaxBytes, until letters age out or are replayed)
// or the letter too large (a job near the max payload grows when wrapped).
// Naking there would bring the job back to derive the same letter, refused
// again, for as long as the DLQ stays full: a job without its record, looping.
// Any other failure (a timeout, no stream leader) is returned, and the write
// is tried again (writeretry.go) — for letterPatience at most: past it (an
// operator deleted the DLQ, and nothing makes it again until a dispatcher
// starts; a DLQ without a leader) the letter is dropped as above. A failing
// letter does not hold placement (errLetter): tried for as long as it failed,
// holding placement, one missing DLQ stopped every tenant's jobs (red team,
// store outages, F4: any tenant's job for a model nobody serves is
// dead-lettered at once).
// firstFailed is when this letter's first publish failed (zero: none did).
func (d *Dispatcher) storeDeadLetter(ctx context.Context, res *schemas.ResultMsg, dlq *schemas.DLQRecordMsg, firstFailed time.Time) error {
	data, err := json.Marshal(dlq)
	if err == nil {
		// The msg id names this record (job, attempt, time), so a retried
		// publish is deduplicated but a replayed job's new dead letter is not.
		_, err = d.js.Publish(ctx, subjects.DLQ(res.Tenant, res.JobID), data, jetstream.WithMsgID(results.MsgID(res)+".dlq"))
	}
	switch {
	case err == nil:
		return nil
	case jserr.IsFull(err) || jserr.IsTooLarge(err) || (!firstFailed.IsZero() && time.Since(firstFailed) > d.letterPatience):
		d.count().deadLetterRefused()
		d.rare.Error().Err(err).Str("job_id", res.JobID).Str("tenant", res.Tenant).Int("bytes", len(data)).
			Msg("the DLQ refused the dead letter (full or too large), or failed past its patience: the job ends with its terminal record only, and cannot be replayed")
		return nil
	}
	d.rare.Error().Err(err).Str("job_id", res.JobID).Str("tenant", res.Tenant).Msg("dlq publish failed; trying again")
	return err
}

// letterPatience is how long a dead letter's failing publishes are tried
// before the letter is dropped and the record written without it
// (Dispatcher.letterPatience; tests shorten it).
const letterPatience = 30 * time.Second
