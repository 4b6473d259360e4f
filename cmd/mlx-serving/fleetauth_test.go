package main

import (
	"context"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/auth"
	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/metrics"
)

// Under auth the gateway's credential may not follow RESULTS (its grants have
// no consumer on it): the fleet observer stops trying after the server's
// refusal instead of asking again every ~15 s, each refusal an error line in
// the log for ever (round 20's second pass).
// Mutation caught: followResults without its permission check (it retries
// until the context ends): red.
func TestFleetStopsFollowingResultsItMayNotRead(t *testing.T) {
	t.Parallel()
	store, b := authBus(t)
	gw, err := store.Credential(auth.RoleGateway, "")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	nc, err := bus.Connect(ctx, bus.ConnectOptions{URLs: []string{b.Server.ClientURL()}, Name: gw.User, User: gw.User, Password: gw.Password, InboxPrefix: gw.InboxPrefix})
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	f, err := metrics.NewFleet(metrics.FleetOptions{Conn: nc})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Stop()
	done := make(chan struct{})
	go func() { defer close(done); followResults(ctx, f, nc, zerolog.Nop()) }()
	select {
	case <-done:
		if ctx.Err() != nil {
			t.Fatal("followResults returned only when its context ended")
		}
	case <-ctx.Done():
		t.Fatal("followResults still retries a minute after the server refused it")
	}
}
