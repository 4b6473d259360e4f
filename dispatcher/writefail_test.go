package dispatcher

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A record the store refuses (here RESULTS at a message limit; in the
// operator round a full disk) is counted where an operator can alert on it and
// tried again while the dispatcher holds the job: once the store takes writes,
// the record the run earned is the one stored, under that run's attempt, and
// the job ran once. Meanwhile no new job is placed. Before, the delivery was
// handed back: each refusal reran the job and used an attempt, so a job with
// one attempt ended attempts_exhausted although its run had succeeded.
// Mutations caught: writeTerminal without d.count().writeFailed() (retryWrite's
// count; the count stays 0); retryWrite returning at once (the nak: "refused"
// runs twice and ends attempts_exhausted); schedule without its
// refusingWrites check ("held" runs while the store refuses).
func TestRefusedRecordWriteIsRetriedNotRerun(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg := jsprov.StreamConfigs(jsprov.Options{})[subjects.StreamResults]
	cfg.MaxMsgs = 1 // full as soon as it holds one record: every later record is refused
	if _, err := e.js.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	runs := map[string]int{}
	e.startWorker("w1", 2, []string{"m"}, func(a schemas.AssignedJob) jobPlan {
		mu.Lock()
		runs[a.Job.ID]++
		mu.Unlock()
		return jobPlan{TokenGap: 2 * time.Millisecond}
	})
	ran := func(id string) int {
		mu.Lock()
		defer mu.Unlock()
		return runs[id]
	}
	cfg2 := testConfig("d1", e.connect("d1"))
	cfg2.MaxAttempts = 1
	d, _ := runDispatcher(t, cfg2)
	first := newJob("fills", "m", "normal")
	if r := e.waitResultAfter(first, 15*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("first job: %+v", r)
	}
	second := newJob("refused", "m", "normal")
	e.mustSubmit(second)
	waitFor(t, 15*time.Second, "a refused record write counted", func() bool { return d.Metrics().RecordWriteFailures.Load() > 0 })
	held := newJob("held", "m", "normal")
	e.mustSubmit(held)
	// Three more refused tries (~1.5 s of backoff): "held" had every chance to be placed.
	n := d.Metrics().RecordWriteFailures.Load()
	waitFor(t, 15*time.Second, "the record tried again", func() bool { return d.Metrics().RecordWriteFailures.Load() >= n+3 })
	if k := ran(held.ID); k != 0 {
		t.Fatalf("a job was placed while the store refused records (ran %d times)", k)
	}
	cfg.MaxMsgs = -1
	if _, err := e.js.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	r := e.waitResult(second.ID, 20*time.Second)
	if r.Status != schemas.StatusCompleted || r.Attempt != 1 || ran(second.ID) != 1 {
		t.Fatalf("after the store took writes again: %+v, ran %d times; want completed at attempt 1, run once", r, ran(second.ID))
	}
	if r := e.waitResult(held.ID, 20*time.Second); r.Status != schemas.StatusCompleted || ran(held.ID) != 1 {
		t.Fatalf("the job held back: %+v, ran %d times", r, ran(held.ID))
	}
}
