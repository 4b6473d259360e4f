package main

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go/jetstream"
)

// A submit retried with its --id after its wait was lost runs nothing again:
// a finished job's result is printed and the exit is its status; a job still
// queued gets exit 6 with the way to its result. Before, both answered
// "duplicate" with exit 1, and a script retrying under a new id ran the job
// twice (red team round 21).
// Mutation caught: submit without submittedBefore: exit 1, no text: red.
func TestSubmitAgainWithItsIDGetsTheResult(t *testing.T) {
	t.Setenv("MLX_SERVING_CONFIG", "")
	b := testenv.StartBus(t, jsprov.Options{})
	done := schemas.JobRequest{ID: "again-done", Model: "m", Prompt: "p", Priority: schemas.PriorityNormal}
	res := &schemas.ResultMsg{Type: "result", JobID: done.ID, Attempt: 1, Status: schemas.StatusCompleted,
		FinishReason: "stop", Text: "the first run's text", FinishedAt: time.Now().UTC()}
	if err := results.Record(testenv.Context(t, 10*time.Second), b.JS, res); err != nil {
		t.Fatal(err)
	}
	code, out, stderr := runReal(t, "submit", "--nats", b.Server.ClientURL(), "--allow-unserved", "--id", done.ID, "-m", "m", "p")
	if code != exitCompleted || !strings.Contains(out, "the first run's text") || !strings.Contains(stderr, "submitted before") {
		t.Fatalf("exit %d, stdout %q, stderr %q; want 0 and the stored text", code, out, stderr)
	}
	code, _, stderr = runReal(t, "submit", "--nats", b.Server.ClientURL(), "--allow-unserved", "--detach", "--id", "again-queued", "-m", "m", "p")
	if code != 0 {
		t.Fatalf("detach: exit %d, %s", code, stderr)
	}
	code, _, stderr = runReal(t, "submit", "--nats", b.Server.ClientURL(), "--allow-unserved", "--id", "again-queued", "-m", "m", "p")
	if code != exitNoResult || !strings.Contains(stderr, "mlx-serving result again-queued") {
		t.Fatalf("exit %d, stderr %q; want 6 and the way to the result", code, stderr)
	}
}

// A submit waiting for its job rides out a NATS restart longer than a few
// reconnect tries and ends with the job's result. Before, the client gave up
// after three tries (~3 s) and exited 1, "failed", while the job ran on (red
// team round 21).
// Mutation caught: submit opening its client with 3 reconnects: exit 6 (1
// before this round), no text: red.
func TestSubmitWaitsThroughANATSRestart(t *testing.T) {
	t.Setenv("MLX_SERVING_CONFIG", "")
	dir := t.TempDir()
	b := testenv.StartBusAt(t, dir, jsprov.Options{})
	url := b.Server.ClientURL()
	port, err := strconv.Atoi(url[strings.LastIndexByte(url, ':')+1:])
	if err != nil {
		t.Fatal(err)
	}
	type run struct {
		code        int
		out, stderr string
	}
	ended := make(chan run, 1)
	go func() {
		c, o, e := runReal(t, "submit", "--nats", url, "--allow-unserved", "--id", "through", "-m", "m", "p")
		ended <- run{c, o, e}
	}()
	testenv.WaitFor(t, 10*time.Second, "the job queued", func() bool { return b.StreamMsgs(t, subjects.StreamJobs) == 1 })
	b.Stop()
	// The outage: longer than three reconnect tries a second apart.
	time.Sleep(5 * time.Second)
	ctx := testenv.Context(t, 30*time.Second)
	srv, err := natsserver.Start(ctx, natsserver.Options{StoreDir: dir, Port: port})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = srv.Shutdown(context.Background()) }()
	js, err := jetstream.New(testenv.Connect(t, srv.ClientURL()))
	if err != nil {
		t.Fatal(err)
	}
	res := &schemas.ResultMsg{Type: "result", JobID: "through", Attempt: 1, Status: schemas.StatusCompleted,
		FinishReason: "stop", Text: "after the restart", FinishedAt: time.Now().UTC()}
	if err := results.Record(ctx, js, res); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-ended:
		if r.code != exitCompleted || !strings.Contains(r.out, "after the restart") {
			t.Fatalf("exit %d, stdout %q, stderr %q; want 0 and the record's text", r.code, r.out, r.stderr)
		}
		// The outage is said, and its end (outageOnly), not the close.
		if !strings.Contains(r.stderr, "nats disconnected") || !strings.Contains(r.stderr, "nats reconnected") || strings.Contains(r.stderr, "closed") {
			t.Fatalf("stderr %q; want the disconnect and the reconnect said, nothing of the close", r.stderr)
		}
	case <-time.After(45 * time.Second):
		t.Fatal("submit still waiting 45 s after the record was stored")
	}
}

// A waiting submit whose server is gone for good says it lost the connection
// and stops at the job's deadline and grace with exit 6, naming the way to
// the result; before, it waited for ever, printing nothing (the final review
// of round 21).
// Mutation caught: submit without the deadline bound: still waiting: red.
func TestSubmitStopsAtItsJobsDeadlineWithTheServerGone(t *testing.T) {
	t.Setenv("MLX_SERVING_CONFIG", "")
	grace := submitGrace
	submitGrace = time.Second
	defer func() { submitGrace = grace }()
	b := testenv.StartBus(t, jsprov.Options{})
	type run struct {
		code   int
		stderr string
	}
	ended := make(chan run, 1)
	go func() {
		c, _, e := runReal(t, "submit", "--nats", b.Server.ClientURL(), "--allow-unserved", "--timeout", "2s", "--id", "gone", "-m", "m", "p")
		ended <- run{c, e}
	}()
	testenv.WaitFor(t, 10*time.Second, "the job queued", func() bool { return b.StreamMsgs(t, subjects.StreamJobs) == 1 })
	b.Stop()
	select {
	case r := <-ended:
		if r.code != exitNoResult || !strings.Contains(r.stderr, "nats disconnected") || !strings.Contains(r.stderr, "mlx-serving result gone") {
			t.Fatalf("exit %d, stderr %q; want 6, the disconnect said, and the way to the result", r.code, r.stderr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("submit still waiting 30 s after its job's deadline and grace")
	}
}
