package dispatcher

import (
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A worker whose heartbeats stop being stored (a full disk refuses them; here
// it writes one at start and none for an hour) but that streams tokens for
// its job is not declared lost at the worker TTL: its job completes at attempt
// 1. Declared lost, the job was retried and the completed record refused as a
// superseded attempt's: with one attempt allowed it ended attempts_exhausted
// (red team, store outages, F3). Mutation caught: tick without the aliveAt
// check (failed attempts_exhausted).
func TestStreamingWorkerIsAliveWithoutHeartbeats(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	tokens := make([]string, 25)
	for i := range tokens {
		tokens[i] = "t"
	}
	e.startWorkerWith("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan {
		return jobPlan{TokenGap: 100 * time.Millisecond, Tokens: tokens}
	}, fakeWorkerOptions{HeartbeatEvery: time.Hour, Silent: true})
	cfg := testConfig("d1", e.connect("d1"))
	cfg.WorkerTTL = 500 * time.Millisecond
	cfg.MaxAttempts = 1
	d, _ := runDispatcher(t, cfg)
	r := e.waitResultAfter(newJob("long", "m", "normal"), 20*time.Second)
	if r.Status != schemas.StatusCompleted || r.Attempt != 1 {
		t.Fatalf("a job streamed for 2.5 s by a worker without heartbeats past a 500 ms TTL: %+v err %+v", r, r.Error)
	}
	if n := d.Metrics().WorkersLost.Load(); n != 0 {
		t.Fatalf("%d workers declared lost", n)
	}
}
