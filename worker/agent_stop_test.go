package worker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// End-to-end tests of how a worker stops: draining, and killed (its heartbeat
// expires). A real embedded NATS server and the real Python runtime.

func TestE2EDrainFinishesRunningWork(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, realConfig(t, b, "w-drain"), true)
	ctx := within(t, 60*time.Second)

	j := newJob("Finish me while draining", 300)
	c := collect(t, b.nc, j.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", j)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	if tok, _ := c.next(ctx); tok == nil {
		t.Fatal("no token")
	}
	pid := a.RuntimePID()
	drained := make(chan error, 1)
	go func() { drained <- a.Drain(ctx) }()

	waitHeartbeat(t, b.kv, "w-drain", 5*time.Second, func(h *schemas.HeartbeatMsg) bool { return h.State == schemas.WorkerDraining })
	if rep := assign(t, b.nc, a.ID(), batch("tiny", newJob("new", 5))); rep.Status != schemas.AssignRejected || rep.Error.Code != schemas.CodeWorkerDraining {
		t.Fatalf("assignment while draining: %+v", rep)
	}
	r := c.untilResult(ctx)
	c.checkStream("")
	if r.Status != schemas.StatusCompleted {
		t.Fatalf("drained job %+v", r)
	}
	select {
	case err := <-drained:
		if err != nil {
			t.Fatalf("Drain: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("Drain did not return")
	}
	if a.State() != StateStopped {
		t.Fatalf("state after drain %s", a.State())
	}
	if _, err := b.kv.Get(ctx, "w-drain"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("registry entry after drain: %v", err)
	}
	if !processGone(pid) {
		t.Fatalf("runtime %d still alive after drain", pid)
	}
}

// helperEnv makes the test binary run one agent until killed (see TestMain).
const helperEnv = "MLX_SERVING_WORKER_HELPER"

func runHelperAgent() {
	nc, err := nats.Connect(os.Getenv("HELPER_URL"))
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	a, err := New(Config{
		WorkerID: os.Getenv("HELPER_ID"), Conn: nc, Slots: 2,
		Python: os.Getenv("HELPER_PYTHON"), Models: []string{"tiny=" + os.Getenv("HELPER_MODEL")},
		HeartbeatInterval: 200 * time.Millisecond,
	})
	if err == nil {
		err = a.Start(context.Background())
	}
	if err == nil {
		err = a.WaitReady(context.Background())
	}
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	fmt.Println("READY", a.RuntimePID())
	select {}
}

func TestE2EHeartbeatExpiresAfterWorkerKilled(t *testing.T) {
	t.Parallel()
	b := startBus(t, 2*time.Second)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=1", "HELPER_URL="+b.srv.ClientURL(), "HELPER_ID=w-killed",
		"HELPER_PYTHON="+pythonPath(t), "HELPER_MODEL="+tinyModel(t))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	var runtimePID int
	if _, serr := fmt.Sscanf(line, "READY %d", &runtimePID); serr != nil || err != nil {
		t.Fatalf("helper worker: %q %v", line, err)
	}
	waitHeartbeat(t, b.kv, "w-killed", 10*time.Second, func(h *schemas.HeartbeatMsg) bool { return h.State == schemas.WorkerReady })

	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	killedAt := time.Now()
	// The KV bucket's TTL removes the entry without a watch event, so poll it.
	ctx := within(t, 20*time.Second)
	for {
		_, err := b.kv.Get(ctx, "w-killed")
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("registry entry still there %s after the kill", time.Since(killedAt))
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The orphaned runtime sees EOF on stdin and exits by itself.
	for !processGone(runtimePID) {
		if ctx.Err() != nil {
			t.Fatalf("runtime %d outlived its killed worker", runtimePID)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
