package dispatcher

import (
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A worker that accepts a job and never answers (hung, or a worker credential
// used to black-hole work: the red team's R3-5) holds a job with a deadline no
// longer than DeadlineGrace past it: the dispatcher tells the worker to stop
// and stores the expired record itself, once.
// Mutation caught: dropping the running-job branch of tick (the job waits for
// the worker's heartbeat, which never lapses, and the test times out).
func TestDispatcherExpiresARunningJobItsWorkerHolds(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Hang: true} })
	cancels := e.cancelsTo("w1")
	cfg := testConfig("d1", e.connect("d1"))
	cfg.DeadlineGrace = 200 * time.Millisecond
	_, stop := runDispatcher(t, cfg)
	defer stop()

	j := newJob("held", "m", schemas.PriorityNormal)
	deadline := time.Now().Add(time.Second)
	j.Deadline = &deadline
	res := e.waitResultAfter(j, 15*time.Second)
	if res.Status != schemas.StatusExpired || res.Error == nil || res.Error.Code != schemas.CodeDeadlineExceeded {
		t.Fatalf("record %+v, want expired with %s", res, schemas.CodeDeadlineExceeded)
	}
	if res.Attempt != 1 || res.WorkerID != "w1" {
		t.Fatalf("record attempt %d on %q, want attempt 1 on w1 (it ran)", res.Attempt, res.WorkerID)
	}
	if res.FinishedAt.Before(deadline.Add(cfg.DeadlineGrace)) {
		t.Fatalf("expired at %s, before the deadline's grace ended (%s)", res.FinishedAt, deadline.Add(cfg.DeadlineGrace))
	}
	select {
	case <-cancels:
	case <-time.After(5 * time.Second):
		t.Fatal("the worker was not told to stop the job")
	}
	if n := e.streamMsgs("RESULTS"); n != 1 {
		t.Fatalf("RESULTS holds %d records, want 1", n)
	}
}
