package jsprov

import (
	"context"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// testBus is one embedded server, a connection and a JetStream context on it.
type testBus struct {
	srv *natsserver.Server
	nc  *nats.Conn
	js  jetstream.JetStream
}

// startBus starts an embedded server on a random port with a t.TempDir() store,
// provisions it with popts and connects. Everything is torn down in t.Cleanup.
func startBus(t *testing.T, popts Options) *testBus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	srv, err := natsserver.Start(ctx, natsserver.Options{Port: -1, StoreDir: t.TempDir(),
		Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)})
	if err != nil {
		t.Fatalf("start server: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	})
	nc, err := nats.Connect(srv.ClientURL(), nats.Name(t.Name()))
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatalf("jetstream.New: %v", err)
	}
	if err := Provision(ctx, js, popts); err != nil {
		t.Fatalf("Provision: %v", err)
	}
	return &testBus{srv: srv, nc: nc, js: js}
}

func ctxT(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func streamMsgs(t *testing.T, js jetstream.JetStream, name string) uint64 {
	t.Helper()
	s, err := js.Stream(ctxT(t), name)
	if err != nil {
		t.Fatalf("stream %s: %v", name, err)
	}
	info, err := s.Info(ctxT(t))
	if err != nil {
		t.Fatalf("stream %s info: %v", name, err)
	}
	return info.State.Msgs
}
