package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/config"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
)

// runService connects to the configured NATS and runs one long-lived part until ctx ends.
func runService(ctx context.Context, name string, c config.Config, stderr io.Writer, run func(ctx context.Context, c config.Config, nc *nats.Conn, log zerolog.Logger) error) int {
	log := newLogger(c, name)
	c, err := serviceConfig(c, name)
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving %s: %v\n", name, err)
		return exitUsage
	}
	stopTracing, err := startTracing(ctx, name, c, log)
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving %s: %v\n", name, err)
		return exitUsage
	}
	defer stopTracing()
	// A connection the client closed for good (the server refused the
	// credentials twice while reconnecting: rotated by auth init --force, a
	// revoked Mac) ends the service, which exits unreachable so its
	// supervisor (systemd, launchd) restarts it with what is on disk now.
	// Left running, it logged failed heartbeats for ever and nothing
	// restarted it (red team round 20, F2).
	ctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	var closing atomic.Bool
	opts := connectOptions(c, "mlx-serving-"+name, log)
	opts.OnClosed = func(err error) {
		if !closing.Load() {
			stop(fmt.Errorf("%w: %v", errConnClosed, err))
		}
	}
	nc, js, err := connectWith(ctx, opts)
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving %s: connect: %v\n", name, err)
		return exitUnreachable
	}
	defer func() { closing.Store(true); nc.Close() }()
	if name == "dispatcher" {
		// Dispatchers own the streams' shape; provisioning is idempotent.
		// A cluster that is electing a leader answers provisioning with errors
		// for a while: wait for it rather than exit (and be restarted) in a loop.
		err := backoff.RetryNotify(func() error { return jsprov.Provision(ctx, js, provisionOptions(c)) },
			backoff.WithContext(backoff.NewExponentialBackOff(backoff.WithMaxElapsedTime(2*time.Minute)), ctx),
			func(err error, wait time.Duration) {
				log.Warn().Err(err).Dur("retry_in", wait).Msg("provisioning failed; retrying")
			})
		if err != nil {
			fmt.Fprintf(stderr, "mlx-serving %s: provision: %v\n", name, err)
			return exitFailed
		}
	}
	stopMetrics, err := startMetrics(ctx, name, c.MetricsAddr, nc, log)
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving %s: %v\n", name, err)
		return exitFailed
	}
	defer stopMetrics()
	err = run(ctx, c, nc, log)
	if cause := context.Cause(ctx); errors.Is(cause, errConnClosed) {
		log.Error().Err(cause).Msg("stopped: the NATS connection is closed for good")
		fmt.Fprintf(stderr, "mlx-serving %s: %v\n", name, cause)
		return exitUnreachable
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		log.Error().Err(err).Msg("stopped with error")
		return exitFailed
	}
	return 0
}

// errConnClosed is a service's connection closed by the client for good.
var errConnClosed = errors.New("the NATS connection was closed (credentials refused, or reconnects spent)")
