package worker

import (
	"strings"

	"github.com/nats-io/nats.go"
)

const cancelPrefix = "mlx.cancel."

// handleCancel serves mlx.cancel.> (core NATS): a running job is cancelled in the
// runtime and ends with the terminal status cancelled. Cancels for jobs this worker
// does not run are someone else's; a queued job's cancel is the dispatcher's, which
// reads the CANCELS stream.
func (a *Agent) handleCancel(msg *nats.Msg) {
	jobID := strings.TrimPrefix(msg.Subject, cancelPrefix)
	if jobID == "" || jobID == msg.Subject {
		return
	}
	if r := a.jobs.get(jobID); r != nil {
		a.log.Info().Str("job_id", jobID).Int("attempt", r.aj.Attempt).Str("model", r.aj.Job.Model).Msg("cancelling running job")
		r.requestStop(stopCancelled)
	}
}
