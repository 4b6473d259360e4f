package natsserver

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
)

// startServerAt starts a server on dir, shut down in t.Cleanup.
func startServerAt(t *testing.T, dir string, opts Options) *Server {
	t.Helper()
	opts.Port = -1
	opts.StoreDir = dir
	opts.Logger = testLogger(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	srv, err := Start(ctx, opts)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	})
	return srv
}

// connectTo connects to srv, closed in t.Cleanup.
func connectTo(t *testing.T, srv *Server) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(srv.ClientURL(), nats.Name(t.Name()))
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// testLogger shows warnings and errors in the test log; BUS_TEST_LOG=debug shows more.
func testLogger(t *testing.T) zerolog.Logger {
	lvl := zerolog.WarnLevel
	if os.Getenv("BUS_TEST_LOG") == "debug" {
		lvl = zerolog.DebugLevel
	}
	return zerolog.New(zerolog.NewTestWriter(t)).Level(lvl).With().Timestamp().Logger()
}

func ctxT(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}
