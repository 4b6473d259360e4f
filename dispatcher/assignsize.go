package dispatcher

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/breaker"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Assignment size: an assignment is one NATS request, and the client refuses
// to publish one over the server's max payload ("nats: maximum payload
// exceeded"). Batching used to budget only the jobs' resumes, so two valid
// jobs of ~786 KB each (a 262,144-character prompt of three-byte characters)
// made a batch over 1 MiB: every job in it lost an attempt to assign_failed
// and the worker's breaker counted a failure that was not the worker's. Now a
// batch is collected under assignBudget, from each job's encoded size (cached
// at intake: no re-marshal per batch decision) plus its resume and envelope.
//
// The schema does not make a lone job fit: messages may hold 256 contents of
// 262,144 characters, and a body that fit the bus when published can grow when
// the dispatcher re-encodes it (encoding/json writes '<', '>' and '&' as six
// bytes each, U+2028 as six). So a job whose own encoding cannot fit any
// assignment fails at intake (invalid_request: no retry can fix it), and a
// lead job whose resume would push it over goes without it (its retry starts
// over, which the caller's stream handles, as when tracking stops at
// resumeCap).

// assignEnvelope is what an assignment holds besides its jobs: the keys, the
// batch id (the dispatcher id and a sequence number), the dispatcher id and
// the model name. The ids are counted from the config (batchOverhead); this
// headroom covers the keys, the sequence number (at most 13 base-36 digits)
// and the model name (at most 256 characters, 1,536 bytes encoded), with room
// to spare for a field added to the schema later.
const assignEnvelope = 4 << 10

// perJobEnvelope is what one job of an assignment holds besides its body and
// its resume text: the keys, the attempt number, the resume's completion
// tokens, the traceparent (55 characters), the placement token (64), the
// separators. About 260 bytes.
const perJobEnvelope = 384

// assignBudgetFor is the most bytes the jobs of one assignment may take, their
// envelopes and resumes included, for a server max payload of maxPayload and
// a dispatcher named dispatcherID (it appears twice: dispatcher_id, batch_id).
func assignBudgetFor(maxPayload int64, dispatcherID string) int {
	mp := int(maxPayload)
	if mp <= 0 {
		mp = 1 << 20 // the server's default
	}
	return mp - assignEnvelope - 2*jsonSize(dispatcherID)
}

// encodedJobSize is how many bytes req takes in an assignment: encoding/json's
// encoding of it, as json.Marshal writes it there. Counted once per job, at
// intake, without keeping the bytes.
func encodedJobSize(req *schemas.JobRequest) int {
	var n byteCounter
	if err := json.NewEncoder(&n).Encode(req); err != nil {
		return int(^uint(0) >> 1) // cannot be encoded: fits nothing
	}
	return int(n) - 1 // Encode ends with a newline
}

type byteCounter int

func (c *byteCounter) Write(p []byte) (int, error) { *c += byteCounter(len(p)); return len(p), nil }

// tooLargeToAssign says why a job of size bytes can never travel in an
// assignment, or nil.
func (d *Dispatcher) tooLargeToAssign(size int) error {
	if size+perJobEnvelope <= d.assignBudget {
		return nil
	}
	return fmt.Errorf("the job encodes to %d bytes; an assignment on this bus carries at most %d of jobs", size, d.assignBudget-perJobEnvelope)
}

// assignCost is what j adds to an assignment, its resume included unless
// withResume is false.
func (j *job) assignCost(withResume bool) int {
	c := j.size + perJobEnvelope
	if withResume {
		c += j.resumeSize
	}
	return c
}

// resumeFits reports whether j, leading a batch of its model, may carry its
// resume: a job that was in an assignment over the max payload (alone) goes
// without it, and so does one whose resume would not fit beside it. Its resume
// is then dropped at launch and the attempt starts over. Callers hold d.mu.
func (d *Dispatcher) resumeFits(j *job) bool {
	return !j.alone && j.assignCost(true)+jsonSize(j.req.Model) <= d.assignBudget
}

// tooLargeToSend handles a batch the client refused to publish as over the
// max payload. Its jobs are requeued as refused (no attempt used), each marked
// to go alone and without its resume; one that was already alone without a
// resume can never be sent on this bus and fails (invalid_request), rather
// than be offered for ever. The worker never saw the batch: its breaker counts
// nothing, except that a half-open breaker whose probe this batch was must
// have the probe ended, and the breaker has no neutral outcome: it is taken as
// a success (at worst the worker takes the breaker's threshold of failures
// again before it opens). Callers hold d.mu.
func (d *Dispatcher) tooLargeToSend(b *batch, w *workerView, err error, now time.Time, mine func(*job) bool) {
	d.count().refused()
	if w != nil && w.br.State() == breaker.HalfOpen {
		w.br.Record(true, now)
	}
	d.log.Warn().Err(err).Str("worker_id", b.worker).Str("batch_id", b.id).Str("model", b.model).Int("jobs", len(b.jobs)).
		Msg("assignment over the max payload; its jobs go alone")
	for _, j := range b.jobs {
		if !mine(j) {
			continue
		}
		if len(b.jobs) == 1 && j.alone && b.msg.Jobs[0].Resume == nil {
			d.endDispatch(j, schemas.CodeInvalidRequest)
			d.finishByDispatcher(j, EvFailed, schemas.StatusFailed, &schemas.ErrorInfo{Code: schemas.CodeInvalidRequest,
				Message: fmt.Sprintf("the job does not fit an assignment on this bus (%v)", err)})
			continue
		}
		j.alone = true
		if d.apply(j, EvRefused) == nil {
			d.enqueue(j, j.enqueued)
		}
	}
}
