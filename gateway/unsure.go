package gateway

import (
	"context"
	"errors"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// cancelUnsure cancels job after its Submit failed with err, unless err
// proves the job was never stored (refusedUnstored).
//
// Why: Submit publishes and then waits for JetStream's ack; a request whose
// client left meanwhile (its context ended) or whose publish timed out gets an
// error although the job may be stored. Its handler returned as if nothing
// were queued: the job ran to its end for nobody, outside its tenant's
// in-flight limit (the slot is freed when the handler returns), and its client
// had no job id to cancel it with (red team round 17, HTTP M1: 5 of 6 clients
// that left 0.5 ms into a streaming request left a 2,016-token job running; 40
// such requests from one tenant with tenant_max_in_flight 1 left 8 jobs
// queued or running). A cancel of a job never stored is harmless: its stored
// cancel waits in CANCELS until it ages out, and a job published after it is
// ended cancelled at intake.
//
// A cancel the bus refuses is tried again, the tenant's slot held meanwhile,
// as for a client that leaves later (holdUntilEnded; the final review of round
// 19: CANCELS full and an ack lost left such a job outside the limit).
func (g *Gateway) cancelUnsure(r context.Context, job *schemas.JobRequest, err error, reason string, slot *heldSlot) {
	if refusedUnstored(err) {
		return
	}
	var until time.Time
	if job.Deadline != nil {
		until = job.Deadline.Add(g.grace)
	}
	g.cancelJob(r, job.Tenant, job.ID, reason, until, slot)
}

// refusedUnstored reports whether a Submit error says the job was not
// stored: refused or ended before its publish (invalid, a model nobody serves,
// too large, no JOBS stream, its client gone: ErrNotSubmitted) or by the store itself (full, a duplicate id — a job
// that is someone's, never to be cancelled here). Not ErrNotConnected: Submit
// also says it for a publish that sat in the client's reconnect buffer, or
// reached the store and lost only its ack (this session's review); a cancel
// then is harmless, or fails and is logged.
func refusedUnstored(err error) bool {
	var verr *schemas.ValidationError
	return errors.As(err, &verr) || errors.Is(err, bus.ErrQueueFull) || errors.Is(err, bus.ErrDuplicate) ||
		errors.Is(err, bus.ErrJobTooLarge) || errors.Is(err, bus.ErrModelNotServed) || errors.Is(err, bus.ErrModelCheck) ||
		errors.Is(err, bus.ErrNoStream) || errors.Is(err, bus.ErrNotSubmitted)
}
