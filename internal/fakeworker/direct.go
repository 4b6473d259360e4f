package fakeworker

import (
	"context"
	"encoding/json"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// maxDirectAttempts bounds the retries of a Plan that always crashes; the job
// then fails, as the dispatcher fails a job out of attempts.
const maxDirectAttempts = 5

// serveDirect takes one job published into JOBS (a core subscription sees
// every message the stream stores, so no consumer is needed). It is accepted
// whatever the free slots, shows up on Assignments as a one-job batch, and
// runs on its own goroutine.
func (w *Worker) serveDirect(m *nats.Msg) {
	if _, _, ok := subjects.ParseJob(m.Subject); !ok {
		return // JOBS' headers-only wake-up (subjects.JobsStored), not a job
	}
	var job schemas.JobRequest
	if err := json.Unmarshal(m.Data, &job); err != nil {
		w.errorf("worker %s: bad job: %v", w.opts.ID, err)
		return
	}
	a := schemas.AssignmentMsg{BatchID: "direct-" + job.ID, Jobs: []schemas.AssignedJob{{Job: job, Attempt: 1}}}
	w.mu.Lock()
	if w.dead || w.assigned[job.ID] > 0 {
		// A core subscription also sees a publish JetStream refused (a job id
		// already queued: the client's expectation): not a job to run again.
		w.mu.Unlock()
		return
	}
	w.inflight++
	w.assigned[job.ID]++
	w.order = append(w.order, job.ID)
	w.batches = append(w.batches, a)
	inc := w.inc
	w.mu.Unlock()
	select {
	case w.onAssign <- a:
	default:
	}
	go w.runDirect(a.Jobs[0], inc)
}

// runDirect plays the dispatcher's part in small: a crashed attempt is retried
// here (resuming from the report, or from scratch when its Plan says
// StartOver), and the terminal record is stored in RESULTS and its event
// published on the reply subject.
func (w *Worker) runDirect(aj schemas.AssignedJob, inc int) {
	for {
		plan := w.opts.Plan(aj)
		o := w.attempt(aj, plan, inc, "")
		if o.crash != nil {
			next := schemas.AssignedJob{Job: aj.Job, Attempt: aj.Attempt + 1}
			if !plan.StartOver {
				next.Resume = &schemas.Resume{Text: o.crash.Text, CompletionTokens: o.crash.CompletionTokens}
			}
			if next.Attempt <= maxDirectAttempts {
				aj = next
				continue
			}
			e := o.crash.Error
			e.Retryable = false
			o.res = &schemas.ResultMsg{Type: "result", JobID: aj.Job.ID, Attempt: aj.Attempt, Seq: o.crash.Seq, Status: schemas.StatusFailed,
				Text: o.crash.Text, Error: &e, Model: aj.Job.Model, Tenant: aj.Job.Tenant, WorkerID: w.opts.ID, FinishedAt: time.Now().UTC()}
		}
		if o.res == nil {
			return // quiet: nothing ends the job
		}
		w.done(inc)
		w.finish(aj.Job, o.res)
		return
	}
}

// finish stores res in RESULTS and publishes it on the job's reply subject, as
// the dispatcher does.
func (w *Worker) finish(job schemas.JobRequest, res *schemas.ResultMsg) {
	ctx, cancel := context.WithTimeout(context.Background(), w.opts.HandOverTimeout)
	defer cancel()
	if err := results.Record(ctx, w.js, res); err != nil {
		w.errs.Add(1)
		if w.opts.Logf != nil {
			w.opts.Logf("worker %s: record %s: %v", w.opts.ID, job.ID, err)
		}
		return
	}
	data, _ := json.Marshal(res)
	_ = w.nc.Publish(job.ReplyTo, data)
	_ = w.nc.Flush()
}
