package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go"
)

// wrr is smooth weighted round robin over schemas.Priorities: every pick adds
// each eligible priority's weight to its credit, takes the largest (ties to the
// higher priority) and charges it the eligible total. Over any window where all
// are eligible, priority i is picked weight_i/sum times, interleaved, so a lower
// priority is never starved however deep the higher queues are.
type wrr struct {
	w   [schemas.NumPriorities]int
	cur [schemas.NumPriorities]int
}

// pick says who is next without committing (the caller may not use it).
func (r *wrr) pick(elig [schemas.NumPriorities]bool) int {
	best, bestC := -1, 0
	for i := range schemas.NumPriorities {
		if !elig[i] {
			continue
		}
		if c := r.cur[i] + r.w[i]; best < 0 || c > bestC {
			best, bestC = i, c
		}
	}
	return best
}

func (r *wrr) commit(p int, elig [schemas.NumPriorities]bool) {
	total := 0
	for i := range schemas.NumPriorities {
		if elig[i] {
			r.cur[i] += r.w[i]
			total += r.w[i]
		}
	}
	r.cur[p] -= total
}

func (d *Dispatcher) schedLoop(ctx context.Context) {
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	for {
		next := d.schedule(time.Now())
		if !t.Stop() {
			select {
			case <-t.C:
			default:
			}
		}
		if !next.IsZero() {
			t.Reset(max(time.Until(next), 0))
		}
		select {
		case <-ctx.Done():
			return
		case <-d.wakeSched:
		case <-t.C:
		}
	}
}

// batch is one assignment in flight.
type batch struct {
	id     string
	worker string
	model  string
	jobs   []*job
	msg    schemas.AssignmentMsg
	// startedAt is the worker process the batch was meant for: an answer that
	// arrives after another process took over came from the one that died.
	startedAt time.Time
}

// schedule requeues due retries and forms every batch that is ready: a model's
// jobs go out when they fill the chosen worker's free slots (or MaxBatch), or
// when the oldest has waited MaxWait. It returns when to look again (zero:
// only when woken). Callers must not hold d.mu.
func (d *Dispatcher) schedule(now time.Time) time.Time {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.draining {
		return time.Time{}
	}
	var next time.Time
	later := func(t time.Time) {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	for _, j := range d.retrying {
		if now.Before(j.retryAt) {
			later(j.retryAt)
			continue
		}
		if j.settling && now.Before(j.settleBy) {
			later(j.settleBy) // the barrier pokes first, unless stuck
			continue
		}
		if j.noting {
			continue // its ledger write pokes when it lands (ledger.go)
		}
		delete(d.retrying, j.key)
		if err := d.apply(j, EvRequeue); err != nil {
			continue
		}
		if j.settling {
			d.jobLog(d.log.Warn(), j).Msg("reply subject did not settle in time; resuming from what was handled")
		}
		j.takeResume()
		j.attempt++
		j.nextSeq = 0
		d.enqueue(j, now)
	}

	if at := d.liftBlocks(now); !at.IsZero() {
		later(at)
	}
	if d.refusingWrites.Load() > 0 {
		// The store refuses terminal writes: a job placed now could not have
		// its record stored (writeretry.go). The last retry to land pokes.
		return next
	}

	skip := map[string]bool{} // models that cannot go out in this pass
	for {
		var heads [schemas.NumPriorities]*job
		var elig [schemas.NumPriorities]bool
		for p := range schemas.NumPriorities {
			for _, j := range d.queues[p] {
				if !skip[j.req.Model] {
					heads[p], elig[p] = j, true
					break
				}
			}
		}
		p := d.pickWRR.pick(elig)
		if p < 0 {
			break
		}
		lead := heads[p]
		model := lead.req.Model
		w, why, cands := d.pickWorker(lead, now)
		if w == nil {
			skip[model] = true
			if d.modelUnserved(model, now) {
				later(d.deadLetterUnserved(model, now))
			}
			continue
		}
		size := min(d.cfg.MaxBatch, w.free())
		// Members: the model's queued jobs the router lets ride to w (the lead
		// always); size+1 of them are enough to fill the batch without waiting.
		var members []*job
		oldest := now
		// The members' encoded sizes (body, resume, envelope) stay within
		// the budget, so the assignment fits the server's max payload
		// (assignsize.go). The lead always goes (alone if it must, and
		// without its resume if only that would not fit: launch). A job past
		// the budget waits for the next batch, and so does every later job
		// of its priority: none overtakes it (FIFO within a priority), and
		// the batch leaves now, full, rather than wait for company.
		budget := d.assignBudget - jsonSize(model) - lead.assignCost(d.resumeFits(lead))
		if lead.alone {
			budget = -1
		}
		full := false
	collect:
		for q := range schemas.NumPriorities {
			for _, j := range d.queues[q] {
				if j.req.Model != model || (j != lead && !d.router.Admit(j, w, cands)) {
					continue
				}
				if j != lead {
					c := j.assignCost(true)
					if j.alone || c > budget {
						full = true
						continue collect // the rest of this priority waits behind it
					}
					budget -= c
				}
				members = append(members, j)
				if j.enqueued.Before(oldest) {
					oldest = j.enqueued
				}
				if len(members) > size {
					break collect
				}
			}
		}
		// A batch short of its size waits (up to MaxWait since its oldest job
		// was queued) only while the consumer holds more jobs: a lone job on an
		// idle queue leaves at once, never waiting for company that is not coming.
		if len(members) < size && !full && d.moreBehind() && now.Sub(oldest) < d.cfg.MaxWait {
			later(oldest.Add(d.cfg.MaxWait))
			skip[model] = true
			continue
		}
		d.pickWRR.commit(p, elig)
		// The lead first, then the rest by priority and FIFO.
		picked := []*job{lead}
		for _, j := range members {
			if len(picked) == size {
				break
			}
			if j != lead {
				picked = append(picked, j)
			}
		}
		d.count().routed(why)
		d.launch(w, model, picked)
	}
	return next
}

// moreBehind reports whether the last fetch of any priority left jobs in its
// consumer.
func (d *Dispatcher) moreBehind() bool {
	for p := range d.behind {
		if d.behind[p].Load() > 0 {
			return true
		}
	}
	return false
}

// launch sends one batch. Callers hold d.mu.
func (d *Dispatcher) launch(w *workerView, model string, jobs []*job) {
	d.batchSeq++
	b := &batch{id: d.cfg.DispatcherID + "-" + strconv.FormatUint(d.batchSeq, 36), worker: w.id, model: model, jobs: jobs, startedAt: w.hb.StartedAt}
	b.msg = schemas.AssignmentMsg{BatchID: b.id, DispatcherID: d.cfg.DispatcherID, Model: model, Jobs: make([]schemas.AssignedJob, len(jobs))}
	if !w.hb.StartedAt.IsZero() {
		started := w.hb.StartedAt
		b.msg.WorkerStartedAt = &started // only that process answers (worker/assign.go)
	}
	for i, j := range jobs {
		d.unqueue(j)
		_ = d.apply(j, EvDispatch)
		j.workerID, j.batchID = w.id, b.id
		j.endedAt = time.Time{}
		j.ran = true
		// What this attempt sends is tracked from its worker's progress
		// events (progress.go), from seq 0.
		j.resetCur()
		j.untracked = false
		j.nextSeq = 0
		if i == 0 && !d.resumeFits(j) && (j.resume.Text != "" || j.resume.CompletionTokens > 0) {
			// The lead with its resume would not fit any assignment.
			d.jobLog(d.log.Warn(), j).Int("size", j.size).Int("resume_size", j.resumeSize).Int("budget", d.assignBudget).
				Msg("the job and its resume do not fit an assignment; the attempt starts over")
			j.resume, j.resumeSize = schemas.Resume{}, 0
		}
		aj := schemas.AssignedJob{Job: j.req, Attempt: j.attempt, Traceparent: d.dispatchTraceparent(j),
			Placement: d.cfg.PlacementKey.Sign(placementOf(j, w.id), time.Now())}
		if j.resume.Text != "" || j.resume.CompletionTokens > 0 {
			r := j.resume
			aj.Resume = &r
		}
		b.msg.Jobs[i] = aj
	}
	w.pending += len(jobs)
	w.br.Take()
	d.io.Add(1)
	d.warm.Go(func() {
		defer d.io.Done()
		d.assign(b)
	})
}

// assign offers the batch and applies the worker's answer.
func (d *Dispatcher) assign(b *batch) {
	data, err := json.Marshal(&b.msg)
	var reply schemas.AssignmentReplyMsg
	reconnects := d.nc.Stats().Reconnects
	if err == nil {
		ctx, cancel := context.WithTimeout(d.wctx, d.cfg.AssignTimeout)
		var m *nats.Msg
		m, err = d.nc.RequestWithContext(ctx, subjects.Assign(b.worker), data)
		cancel()
		if err == nil {
			reply, err = decodeAssignReply(m.Data)
		}
	}
	now := time.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	defer poke(d.wakeSched)
	defer poke(d.wakePull)
	w := d.workers[b.worker]
	if w != nil {
		w.pending -= len(b.jobs)
	}
	mine := func(j *job) bool { return !j.gone && j.batchID == b.id && j.state == StateDispatched }
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		// Nobody serves the subject: the batch surely did not start.
		d.count().assignFailed()
		if w != nil {
			w.br.Record(false, now)
			w.block(now)
		}
		for _, j := range b.jobs {
			if mine(j) && d.apply(j, EvRefused) == nil {
				d.enqueue(j, j.enqueued)
			}
		}
	case errors.Is(err, nats.ErrMaxPayload):
		// Never sent: the batch was over the max payload after all (the
		// server's shrank on a reconnect, or a size was counted short). Not
		// the worker's fault, nor the jobs': no breaker failure, no attempt.
		d.tooLargeToSend(b, w, err, now, mine)
	case err != nil:
		d.count().assignFailed()
		// Lost to this dispatcher's own connection (it dropped during the
		// request: a NATS restart), the attempt is neither the worker's
		// failure nor the jobs': the worker may have taken the batch, so the
		// next attempt still numbers higher, but it is not counted against
		// max_attempts — at most max_attempts of them, so an outage that
		// never ends still ends the job. Before, every NATS restart during an
		// assignment used one attempt of each job in it, and jobs that never
		// ran ended attempts_exhausted (red team round 22: 2 of 300 jobs
		// through 20 restarts of a standalone server).
		outage := !d.nc.IsConnected() || d.nc.Stats().Reconnects != reconnects
		if w != nil {
			w.br.Record(false, now)
		}
		d.log.Warn().Err(err).Bool("connection_lost", outage).Str("worker_id", b.worker).Str("batch_id", b.id).Str("model", b.model).Int("jobs", len(b.jobs)).Msg("assignment failed")
		for _, j := range b.jobs {
			if mine(j) {
				if outage && j.spared < d.cfg.MaxAttempts {
					j.spared++
				}
				d.endDispatch(j, schemas.CodeAssignFailed)
				d.retryableFailure(j, schemas.ErrorInfo{Code: schemas.CodeAssignFailed, Message: err.Error(), Retryable: true}, nil, 0)
			}
		}
	case reply.Status == schemas.AssignAccepted && w != nil && !w.hb.StartedAt.Equal(b.startedAt):
		// The process that took the batch is gone (or, far less likely, its
		// successor took it; then the job runs twice and RESULTS keeps the first).
		d.count().accepted(len(b.jobs))
		for _, j := range b.jobs {
			if mine(j) {
				d.endDispatch(j, schemas.CodeWorkerRestarted)
				d.retryableFailure(j, schemas.ErrorInfo{Code: schemas.CodeWorkerRestarted, Message: "the worker restarted after it accepted the job", Retryable: true}, nil, 0)
			}
		}
	case reply.Status == schemas.AssignAccepted:
		d.count().accepted(len(b.jobs))
		if w != nil {
			w.br.Record(true, now)
		}
		for _, j := range b.jobs {
			if mine(j) {
				_ = d.apply(j, EvAccepted)
				d.endDispatch(j, "")
				if j.cancelReq {
					// Cancelled while the offer was on its way.
					d.forwardCancel(j, "cancelled by request")
				}
			}
		}
		if w != nil {
			w.answered(reply.FreeSlots)
		}
	default: // full or rejected: skip this worker until it reports again
		d.count().refused()
		if w != nil {
			// It answered: healthy, just busy. But a full that states at
			// least as many free slots as the batch had contradicts itself
			// (a worker refuses a batch only when it has fewer): a
			// credential answering every offer so kept jobs from ever
			// running or using an attempt (red team round 11, F1). It
			// counts as a failure, so repeated it opens the breaker.
			lie := reply.Status == schemas.AssignFull && reply.FreeSlots >= len(b.jobs)
			w.br.Record(!lie, now)
			// Whatever free slots it stated are not taken: nothing more
			// goes there until its next heartbeat says them afresh (and
			// refusalHold has passed), so a full is no tight re-offer loop.
			w.block(now)
		}
		for _, j := range b.jobs {
			if mine(j) && d.apply(j, EvRefused) == nil {
				d.enqueue(j, j.enqueued)
			}
		}
	}
}
