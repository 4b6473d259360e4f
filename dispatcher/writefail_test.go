package dispatcher

import (
	"context"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A record the store refuses (here RESULTS at a message limit; in the
// operator round a full disk) is counted where an operator can alert on it,
// and the job runs again once the store takes writes: before, such failures
// were only a log line while /readyz and status said all was well.
// Mutation caught: dispatcher/terminal.go writeTerminal without
// d.count().writeFailed() on a failed record (the count stays 0).
func TestRefusedRecordWriteIsCountedAndRetried(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg := jsprov.StreamConfigs(jsprov.Options{})[subjects.StreamResults]
	cfg.MaxMsgs = 1 // full as soon as it holds one record: every later record is refused
	if _, err := e.js.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	// Each refused record hands the delivery back, and the rerun uses an
	// attempt (a store that refuses writes still burns a job's attempts:
	// RELIABILITY says so): runs of ~100 ms and 20 attempts leave seconds to
	// lift the limit in.
	e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{TokenGap: 20 * time.Millisecond} })
	cfg2 := testConfig("d1", e.connect("d1"))
	cfg2.MaxAttempts = 20
	d, _ := runDispatcher(t, cfg2)
	first := newJob("fills", "m", "normal")
	if r := e.waitResultAfter(first, 15*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("first job: %+v", r)
	}
	second := newJob("refused", "m", "normal")
	e.mustSubmit(second)
	waitFor(t, 15*time.Second, "a refused record write counted", func() bool { return d.Metrics().RecordWriteFailures.Load() > 0 })
	cfg.MaxMsgs = -1
	if _, err := e.js.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if r := e.waitResult(second.ID, 20*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("after the store took writes again: %+v", r)
	}
}
