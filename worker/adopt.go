package worker

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// adopt offers data, a completed terminal record whose dispatcher is gone or
// does not answer (handOverUnanswered), to any dispatcher on subjects.Adopt with
// placement, the assignment's token (internal/placement), and returns the
// answer: stored, exists or unknown (dispatcher/adopt.go). Tried again, up to
// ResultTimeout, while no dispatcher answers (none up yet) and on timeouts (a
// dispatcher does not answer a write the store refused).
//
// Why: the record otherwise went nowhere, and the job's redelivery ran it
// again from the start — with max_attempts 1, a job that had completed ended
// attempts_exhausted.
func (a *Agent) adopt(ctx context.Context, data []byte, placement string) (string, error) {
	msg := nats.NewMsg(subjects.Adopt(a.cfg.WorkerID))
	msg.Data = data
	msg.Header.Set(subjects.HeaderPlacement, placement)
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 100 * time.Millisecond
	bo.MaxElapsedTime = a.cfg.ResultTimeout
	var reply schemas.FinishReplyMsg
	err := backoff.Retry(func() error {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		m, err := a.nc.RequestMsgWithContext(rctx, msg)
		if err != nil {
			return err
		}
		if json.Unmarshal(m.Data, &reply) != nil || reply.Status == "" {
			return backoff.Permanent(fmt.Errorf("worker: bad adoption reply %q", m.Data))
		}
		return nil
	}, bo)
	return reply.Status, err
}
