package worker

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/breaker"
	"github.com/mlx-serving/mlx-serving/schemas"
)

func TestParseModelSpec(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]ModelSpec{
		"/models/Llama-3-8B":       {ID: "Llama-3-8B", Path: "/models/Llama-3-8B"},
		"/models/Llama-3-8B/":      {ID: "Llama-3-8B", Path: "/models/Llama-3-8B/"},
		"llama=/models/Llama-3-8B": {ID: "llama", Path: "/models/Llama-3-8B"},
	} {
		if got := ParseModelSpec(in); got != want {
			t.Errorf("%q: %+v, want %+v", in, got, want)
		}
	}
}

// A runtime that stops answering health checks is killed, its running job is
// reported for retry, and a new runtime takes its place. The runtime here is this
// test binary speaking the protocol (no Python needed to wedge one).
func TestSupervisorRestartsWedgedRuntime(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	cfg := fakeConfig(t, b, "w-wedged", 5*time.Millisecond)
	cfg.RuntimeEnv = append(cfg.RuntimeEnv, "FAKE_HANG_HEALTH=1")
	cfg.HealthInterval = 300 * time.Millisecond
	cfg.HealthTimeout = 300 * time.Millisecond
	a := startAgent(t, cfg, true)
	ctx := within(t, 30*time.Second)
	pid := a.RuntimePID()

	j := newJob("long", 30000)
	reports := attemptReports(t, b.nc, a.ID())
	if rep := assign(t, b.nc, a.ID(), batch("tiny", j)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	select {
	case m := <-reports:
		var rep schemas.AttemptReportMsg
		_ = json.Unmarshal(m.Data, &rep)
		if rep.Error.Code != schemas.CodeRuntimeCrashed || !rep.Error.Retryable || rep.Seq == 0 {
			t.Fatalf("attempt report %+v", rep)
		}
	case <-ctx.Done():
		t.Fatal("no attempt report for the job on the wedged runtime")
	}
	waitNewRuntime(t, ctx, a, pid)
	deadline := time.Now().Add(5 * time.Second)
	for !processGone(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("wedged runtime %d was not killed", pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if a.BreakerState() != breaker.Closed {
		t.Fatalf("one crash opened the breaker: %s", a.BreakerState())
	}
}
