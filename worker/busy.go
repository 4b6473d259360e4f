package worker

import (
	"context"
	"errors"
	"time"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// A generate the runtime refuses with runtime_busy is tried again here, on the
// same runtime, holding the job's slot, rather than reported for a retry.
//
// Why: the runtime refuses a structured generate at once while its grammar
// compile threads are full — two stuck or four running compiles of the
// request's tenant, or eight of all tenants together (compiler.py). Reported,
// each refusal used one of the job's attempts, so a tenant's structured job
// could fail attempts_exhausted within a second while other tenants' slow
// schemas filled the runtime's threads (red team round 10, left open then).
// Nothing of the job ran (the refusal comes before the compile), so trying
// again costs no tokens and the caller's stream sees nothing of it.
//
// Bounded: waits double from busyRetryFirst to busyRetryMax, for busyRetryFor
// in all; then the refusal is reported as before (another runtime may be
// free). A stop (cancel, deadline, retry stop, shutdown) ends the wait at once.
const (
	busyRetryFirst = 100 * time.Millisecond
	busyRetryMax   = 2 * time.Second
	busyRetryFor   = 15 * time.Second
)

// generateWhenFree is c.Generate, tried again while the runtime answers
// runtime_busy (see above).
func (a *Agent) generateWhenFree(ctx context.Context, r *jobRun, c *RuntimeClient, p *schemas.GenerateParams, hooks GenerateHooks) (*schemas.GenerateResult, error) {
	giveUp := time.Now().Add(busyRetryFor)
	wait := busyRetryFirst
	for {
		gen, err := c.Generate(ctx, p, hooks)
		if !runtimeBusy(err) || r.reason() != "" || time.Now().Add(wait).After(giveUp) {
			return gen, err
		}
		a.log.Debug().Str("job_id", r.aj.Job.ID).Dur("wait", wait).Msg("runtime busy compiling grammars; trying again")
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-r.stopCh:
			t.Stop()
			return gen, err
		case <-ctx.Done():
			t.Stop()
			return gen, err
		}
		wait = min(2*wait, busyRetryMax)
	}
}

// runtimeBusy reports whether the runtime refused a generate with runtime_busy.
func runtimeBusy(err error) bool {
	var rerr *RuntimeError
	return errors.As(err, &rerr) && rerr.Code() == schemas.CodeRuntimeBusy
}
