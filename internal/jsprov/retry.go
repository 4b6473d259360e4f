package jsprov

import (
	"context"
	"errors"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// provisionTry bounds one JetStream API request of Provision.
const provisionTry = 10 * time.Second

// jsClusterNotAvailable is the server's "JetStream system temporarily
// unavailable" (no meta leader yet, or one being elected).
const jsClusterNotAvailable jetstream.ErrorCode = 10008

// retryAPI runs op with a context of its own bounded by provisionTry, and again
// with backoff while the failure is one a forming cluster gives — no answer
// within the try, no responder, the system temporarily unavailable — until
// ctx ends. Each op here is idempotent (create or update to one config).
//
// Why: a request sent while a cluster elects its meta leader can go
// unanswered, and Provision then waited for the whole of ctx on it: against a
// three-node cluster just started, the JOBS stream was created (its leader
// elected) and the caller still timed out after 2 minutes (a clean-clone CI
// run, session 13).
func retryAPI(ctx context.Context, op func(context.Context) error) error {
	bo := backoff.WithContext(backoff.NewExponentialBackOff(backoff.WithInitialInterval(200*time.Millisecond),
		backoff.WithMaxInterval(5*time.Second), backoff.WithMaxElapsedTime(0)), ctx)
	return backoff.Retry(func() error {
		tctx, cancel := context.WithTimeout(ctx, provisionTry)
		defer cancel()
		err := op(tctx)
		if err == nil || ctx.Err() != nil || !transient(err) {
			return backoff.Permanent(err)
		}
		return err
	}, bo)
}

func transient(err error) bool {
	var apiErr *jetstream.APIError
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) || errors.Is(err, nats.ErrNoResponders) ||
		errors.Is(err, jetstream.ErrNoStreamResponse) ||
		(errors.As(err, &apiErr) && apiErr.ErrorCode == jsClusterNotAvailable)
}
