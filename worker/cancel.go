package worker

import (
	"encoding/json"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// handleCancel serves mlx.worker.<id>.cancel (core NATS): the dispatcher that
// placed a job forwards its cancel here, and a running job is cancelled in the
// runtime and ends with the terminal status cancelled. Workers read no other
// cancels: a job's id is known only to the worker it runs on.
func (a *Agent) handleCancel(msg *nats.Msg) {
	var c schemas.CancelMsg
	if err := json.Unmarshal(msg.Data, &c); err != nil || c.JobID == "" {
		return
	}
	if r := a.jobs.get(subjects.JobRef{Tenant: c.Tenant, ID: c.JobID}.Key()); r != nil {
		if c.Attempt != 0 && c.Attempt != r.aj.Attempt {
			// A cancel its dispatcher sent for an earlier attempt (one it gave
			// up on, attempt_timeout), arriving after a later attempt of the job
			// was placed here: the later attempt is not the one to stop.
			a.log.Debug().Str("job_id", c.JobID).Int("attempt", r.aj.Attempt).Int("cancel_attempt", c.Attempt).Msg("cancel of another attempt ignored")
			return
		}
		if c.Retry {
			a.log.Info().Str("job_id", c.JobID).Str("tenant", c.Tenant).Int("attempt", r.aj.Attempt).Str("model", r.aj.Job.Model).Msg("stopping running job for a retry")
			r.requestStop(stopRetry)
			return
		}
		a.log.Info().Str("job_id", c.JobID).Str("tenant", c.Tenant).Int("attempt", r.aj.Attempt).Str("model", r.aj.Job.Model).Msg("cancelling running job")
		r.requestStop(stopCancelled)
	}
}
