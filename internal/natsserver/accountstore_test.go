package natsserver_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

// accountConf writes a server configuration that keeps JetStream in account
// MLX, with one user in it.
func accountConf(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "auth.conf")
	conf := `accounts { MLX: { jetstream: enabled, users: [ { user: admin, password: s3cret } ] } }` + "\n"
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// startIn starts a server on dir, with accounts (conf) or without (""), and
// returns it with a JetStream context of a user of its JetStream account.
func startIn(t *testing.T, dir, conf string) (*natsserver.Server, jetstream.JetStream, error) {
	t.Helper()
	opts := natsserver.Options{Port: -1, StoreDir: dir, Logger: testenv.Logger(t), StoreAccounts: []string{"MLX"}}
	if conf != "" {
		opts.AuthConf, opts.Account = conf, "MLX"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv, err := natsserver.Start(ctx, opts)
	if err != nil {
		return nil, nil, err
	}
	t.Cleanup(func() { _ = srv.Shutdown(context.Background()) })
	var copts []nats.Option
	if conf != "" {
		copts = append(copts, nats.UserInfo("admin", "s3cret"))
	}
	nc, err := nats.Connect(srv.ClientURL(), copts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return srv, js, nil
}

func putJobs(t *testing.T, js jetstream.JetStream, n int) {
	t.Helper()
	ctx := testenv.Context(t, 20*time.Second)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "JOBS", Subjects: []string{"jobs.>"}}); err != nil {
		t.Fatal(err)
	}
	for range n {
		if _, err := js.Publish(ctx, "jobs.x", []byte("job")); err != nil {
			t.Fatal(err)
		}
	}
}

func jobsHeld(t *testing.T, js jetstream.JetStream) uint64 {
	t.Helper()
	ctx := testenv.Context(t, 20*time.Second)
	s, err := js.Stream(ctx, "JOBS")
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

// Queued jobs follow the data dir when accounts are turned on (auth init on a
// store used without them, or an upgrade from a release that kept every user
// in the global account) and off again: before, the account in use found no
// streams, made new empty ones, and every queued job and record was unseen
// (red team round 19, opstore F1).
// Mutation caught: Start without moveAccountStore.
func TestStreamsFollowTheDataDirAcrossAccounts(t *testing.T) {
	t.Parallel()
	dir, conf := t.TempDir(), accountConf(t)
	srv, js, err := startIn(t, dir, "")
	if err != nil {
		t.Fatal(err)
	}
	putJobs(t, js, 5)
	ctx := testenv.Context(t, 20*time.Second)
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	srv, js, err = startIn(t, dir, conf)
	if err != nil {
		t.Fatal(err)
	}
	if n := jobsHeld(t, js); n != 5 {
		t.Fatalf("with accounts on, JOBS holds %d, want the 5 queued without them", n)
	}
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	_, js, err = startIn(t, dir, "")
	if err != nil {
		t.Fatal(err)
	}
	if n := jobsHeld(t, js); n != 5 {
		t.Fatalf("with accounts off again, JOBS holds %d, want 5", n)
	}
}

// Streams under both accounts: Start refuses, naming the directories, rather
// than pick one and leave the other's jobs unseen.
func TestStreamsUnderTwoAccountsAreRefused(t *testing.T) {
	t.Parallel()
	dir, conf := t.TempDir(), accountConf(t)
	srv, js, err := startIn(t, dir, "")
	if err != nil {
		t.Fatal(err)
	}
	putJobs(t, js, 1)
	ctx := testenv.Context(t, 20*time.Second)
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	// Streams of the other account, as an earlier release left them.
	mlx := filepath.Join(dir, "jetstream", "MLX", "streams", "JOBS")
	if err := os.MkdirAll(mlx, 0o750); err != nil {
		t.Fatal(err)
	}
	if _, _, err := startIn(t, dir, conf); !errors.Is(err, natsserver.ErrStoreInTwoAccounts) {
		t.Fatalf("Start with streams under $G and MLX: %v, want ErrStoreInTwoAccounts", err)
	}
	// The lock was let go: the operator's next start is not refused as in use.
	if err := os.RemoveAll(filepath.Join(dir, "jetstream", "MLX")); err != nil {
		t.Fatal(err)
	}
	if _, js, err = startIn(t, dir, conf); err != nil {
		t.Fatal(err)
	}
	if n := jobsHeld(t, js); n != 1 {
		t.Fatalf("JOBS holds %d, want 1", n)
	}
}
