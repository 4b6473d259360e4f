package gateway

import (
	"context"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
)

// cancelRetryFor bounds how long a cancel the bus refused is tried again when
// the job has no deadline (RequestTimeout negative): past it, the slot goes.
const cancelRetryFor = 10 * time.Minute

// heldSlot is a tenant's in-flight slot (limiter.acquire). The handler holds
// it, and so does each of its jobs' cancels the bus refused while it is tried
// again (holdUntilEnded); the last holder to let go releases it.
//
// Why: a client that leaves frees its slot at once, and its job is cancelled.
// When the cancel could not be stored (CANCELS full, the bus away), the job
// still queued or ran, yet the slot was free: a tenant limited to 2 in flight
// held 125 jobs, and another tenant's request waited past a minute behind them
// (red team round 19, tenanthttp F1).
type heldSlot struct {
	mu      sync.Mutex
	holders int // 0 once released: it is not taken again
	release []func()
}

func newHeldSlot(release func()) *heldSlot { return &heldSlot{holders: 1, release: []func(){release}} }

// also makes release, another slot of the same request (a choice of n > 1),
// go with this one, and reports whether it will; if not (nil, or released
// already), the caller releases it itself. Before, the further choices' slots
// went when the handler returned, whatever their jobs' cancels: a limit of L
// held L(L+1)/2 uncancelled jobs (the second pass).
func (s *heldSlot) also(release func()) bool {
	return s.whileHeld(func() { s.release = append(s.release, release) })
}

// hold adds a holder, unless the slot was released already (a cancel after
// the handler returned): then it reports false, and done must not be called.
func (s *heldSlot) hold() bool { return s.whileHeld(func() { s.holders++ }) }

// whileHeld runs f under the lock if the slot is not released yet, and
// reports whether it was.
func (s *heldSlot) whileHeld(f func()) bool {
	if s == nil {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.holders == 0 {
		return false
	}
	f()
	return true
}

func (s *heldSlot) done() {
	if s == nil {
		return
	}
	s.mu.Lock()
	if s.holders == 0 {
		s.mu.Unlock()
		return
	}
	s.holders--
	last := s.holders == 0
	s.mu.Unlock()
	if last {
		for _, release := range s.release {
			release()
		}
	}
}

// cancelJob asks the fleet to stop tenant's job id. A cancel the bus refuses
// is tried again in the background (holdUntilEnded) with the tenant's slot held,
// until until (the job's deadline and grace; zero: cancelRetryFor from now).
func (g *Gateway) cancelJob(r context.Context, tenant, id, reason string, until time.Time, slot *heldSlot) {
	if until.IsZero() {
		until = time.Now().Add(cancelRetryFor)
	}
	if keyedJob(id) {
		// Never cancelled here: its client may come back for it, and a retry
		// may be watching it (idempotency.go). Its slot is held until it ends,
		// so leaving does not take a tenant past its in-flight limit; a retry
		// with the key joins that hold (keyedHolds).
		g.log.Info().Str("job_id", id).Str("reason", reason).Msg("job named by an idempotency key not cancelled; the tenant's in-flight slot held until it ends")
		if g.limits.limits.MaxInFlight > 0 && g.holds.start(tenant, id, slot) {
			g.waitEnded(tenant, id, "", until, func() { g.holds.end(tenant, id, slot) })
		}
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r), cancelTimeout)
	defer cancel()
	err := g.jobs.Cancel(ctx, tenant, id, reason)
	if err == nil {
		return
	}
	g.log.Warn().Err(err).Str("job_id", id).Msg("cancelling the job failed; trying again, the tenant's in-flight slot held meanwhile")
	g.holdUntilEnded(tenant, id, reason, until, slot)
}

// holdUntilEnded holds slot until tenant's job id has its record (it ended:
// nothing left to cancel, and the slot held for nothing until the deadline, a
// goroutine each: the second pass) or until passes (the job's deadline and
// grace: the dispatcher ends the job by then anyway). With a reason it tries
// the job's cancel again meanwhile, until one is stored; without, it only
// waits (a job an idempotency key names).
func (g *Gateway) holdUntilEnded(tenant, id, reason string, until time.Time, slot *heldSlot) {
	held := slot.hold()
	g.waitEnded(tenant, id, reason, until, func() {
		if held {
			slot.done()
		}
	})
}

// waitEnded is holdUntilEnded's wait, on a goroutine of its own; then runs
// once it is over.
func (g *Gateway) waitEnded(tenant, id, reason string, until time.Time, then func()) {
	go func() {
		defer then()
		bo := backoff.NewExponentialBackOff()
		bo.InitialInterval, bo.MaxInterval = 200*time.Millisecond, 10*time.Second
		bo.MaxElapsedTime = max(time.Until(until), time.Millisecond)
		err := backoff.Retry(func() error {
			ctx, cancel := context.WithTimeout(context.Background(), cancelTimeout)
			defer cancel()
			if ended, _ := g.jobs.Ended(ctx, tenant, id); ended {
				return nil
			}
			if reason == "" {
				return errNotEnded
			}
			return g.jobs.Cancel(ctx, tenant, id, reason)
		}, bo)
		if err != nil {
			g.log.Warn().Err(err).Str("job_id", id).Msg("the job did not end, nor was its cancel stored, before its deadline; its in-flight slot is released")
			return
		}
		g.log.Info().Str("job_id", id).Msg("the job's cancel was stored on a later try, or the job ended")
	}()
}
