package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/config"
	"github.com/mlx-serving/mlx-serving/dispatcher"
	"github.com/mlx-serving/mlx-serving/metrics"
	"github.com/mlx-serving/mlx-serving/worker"
)

// startMetrics starts what a long-running process exports, into the process's
// shared registry (metrics.Default), and returns the function that stops it:
//
//   - the fleet observer, in every role but worker: a fleet of Macs each
//     following every terminal result would only multiply the same numbers;
//   - when addr is set (--metrics-addr), an HTTP server with GET /metrics on it;
//     for the gateway (and so `up`) it also serves the gateway's own series,
//     which are then not served on http_addr (gatewayMetricsHandler). Before,
//     the gateway served /metrics on http_addr whatever metrics_addr said:
//     where clients reach the gateway, anyone could read the fleet's queue
//     depth, per-model counts and records held (red team round 16).
//
// The observer not finding RESULTS yet (no dispatcher has provisioned the
// streams) is not fatal: it retries in the background, and its gauges read the
// bus at every scrape meanwhile. A server that cannot bind is an error: the
// operator asked for it.
func startMetrics(ctx context.Context, role, addr string, nc *nats.Conn, log zerolog.Logger) (stop func(), err error) {
	reg := metrics.Default()
	var stops []func()
	stop = func() {
		for i := len(stops) - 1; i >= 0; i-- {
			stops[i]()
		}
	}
	if role != "worker" {
		f, err := metrics.NewFleet(metrics.FleetOptions{Conn: nc, Logger: log})
		if err != nil {
			return stop, err
		}
		fctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		done := make(chan struct{})
		go func() {
			defer close(done)
			followResults(fctx, f, nc, log)
		}()
		stops = append(stops, func() { cancel(); <-done; f.Stop() })
		if err := reg.Register(f); err != nil {
			stop()
			return func() {}, fmt.Errorf("metrics: register fleet observer: %w", err)
		}
		stops = append(stops, func() { reg.Unregister(f) })
	}
	if addr == "" {
		return stop, nil
	}
	handler := metrics.Handler(reg)
	if role == "gateway" || role == "up" {
		handler = gatewayMetrics().Handler()
	}
	srv, err := metrics.Listen(addr, handler)
	if err != nil {
		stop()
		return func() {}, err
	}
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(sctx); err != nil {
			log.Error().Err(err).Msg("metrics server stopped")
		}
	}()
	stops = append(stops, func() { cancel(); <-done })
	log.Info().Str("addr", "http://"+srv.Addr()+"/metrics").Msg("serving metrics")
	return stop, nil
}

// followResults starts f, retrying every few seconds until it works or ctx ends.
//
// A credential that may not follow RESULTS (the gateway's under auth) is told
// so by the server as a permissions violation on the consumer create: then it
// stops, saying so once. It asked again every ~15 s before, each refusal an
// error line in the log for ever (round 20's second pass).
func followResults(ctx context.Context, f *metrics.Fleet, nc *nats.Conn, log zerolog.Logger) {
	for warned := false; ; warned = true {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := f.Start(sctx)
		cancel()
		if err == nil || ctx.Err() != nil {
			return
		}
		if last := nc.LastError(); errors.Is(last, nats.ErrPermissionViolation) && strings.Contains(last.Error(), "CONSUMER.CREATE") {
			log.Info().Msg("fleet metrics: this credential may not follow RESULTS; the finished-job counters stay off (queue, DLQ and worker gauges work)")
			return
		}
		if !warned {
			log.Warn().Err(err).Msg("fleet metrics: not following results yet; retrying (queue, DLQ and worker gauges work meanwhile)")
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(5 * time.Second):
		}
	}
}

// workerObserver is the worker's metrics hooks (worker.Config.Observer), in the
// shared registry; nil (no metrics) if they cannot be registered.
func workerObserver(id string, log zerolog.Logger) worker.Observer {
	w, err := metrics.NewWorker(metrics.Default(), id)
	if err != nil {
		log.Warn().Err(err).Msg("worker metrics unavailable")
		return nil
	}
	return w
}

// dispatcherObserver is the dispatcher's metrics hooks
// (dispatcher.Config.Observer), in the shared registry.
func dispatcherObserver() (dispatcher.Observer, error) {
	d, err := metrics.NewDispatcher(metrics.Default())
	if err != nil {
		return nil, fmt.Errorf("metrics: register dispatcher: %w", err)
	}
	return d, nil
}

// gatewayMetrics is the process's gateway metrics hooks
// (gateway.Config.Observer): one per process, so the /metrics that
// startMetrics serves on metrics_addr and the one on http_addr show the same
// series.
var gatewayMetrics = sync.OnceValue(metrics.NewGateway)

// gatewayMetricsHandler is what the gateway serves on GET /metrics of its
// http_addr (gateway.Config.Metrics): the gateway's series with the shared
// registry's — or nothing when metrics_addr is set, where startMetrics serves
// them instead, so an operator can keep metrics off the address clients reach.
func gatewayMetricsHandler(c config.Config) http.Handler {
	if c.MetricsAddr != "" {
		return nil
	}
	return gatewayMetrics().Handler()
}
