package dispatcher

import (
	"context"
	"encoding/json"
	"strconv"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go"
)

// A job whose metadata asks for an attempt base near or past the schemas'
// maximum attempt still ends, with a valid record: the base is clamped so
// every attempt the dispatcher can number (base + MaxAttempts) fits. Unclamped,
// mlx_attempt_base 100 made attempt 101, every record of which failed its
// schema and was dropped, and the job was in-progress-acked for ever. A value
// that is no number counts as no base.
// Mutation caught: attemptBase returning n unclamped (the 100 and 1000 jobs
// never end).
func TestAttemptBaseClampedToSchemaMaximum(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w1", 4, []string{"m"}, nil)
	cfg := testConfig("d1", e.connect("d1"))
	d, _ := runDispatcher(t, cfg)
	top := schemas.MaxAttempt - cfg.MaxAttempts + 1 // the first attempt of a clamped base
	for _, tc := range []struct {
		base    string
		attempt int
	}{{"100", top}, {"1000", top}, {"garbage", 1}, {strconv.Itoa(schemas.MaxAttempt - cfg.MaxAttempts), top}} {
		j := newJob("base-"+tc.base, "m", "normal")
		j.Metadata = map[string]string{schemas.MetadataAttemptBase: tc.base}
		r := e.waitResultAfter(j, 10*time.Second)
		if r.Status != schemas.StatusCompleted || r.Attempt != tc.attempt {
			t.Fatalf("base %s: terminal %+v, want completed at attempt %d", tc.base, r, tc.attempt)
		}
		stored := e.waitResult(j.ID, 5*time.Second)
		data, _ := json.Marshal(stored)
		if err := schemas.Validate(schemas.Result, data); err != nil || stored.Attempt != tc.attempt {
			t.Fatalf("base %s: stored record %s: %v", tc.base, data, err)
		}
	}
	if n := d.Metrics().BaseClamped.Load(); n != 2 {
		t.Fatalf("%d clamped bases counted, want 2 (100 and 1000)", n)
	}
}

// With a clamped base a job that fails every attempt still runs out of
// attempts within the schemas: its last attempt is MaxAttempt, its record and
// dead letter say so and are valid.
// Mutation caught: the clamp at MaxAttempt - MaxAttempts + 1 (the last attempt
// is 101: its report is dropped, the job never ends).
func TestClampedBaseExhaustsWithinSchemaMaximum(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Crash: 1} })
	cfg := testConfig("d1", e.connect("d1"))
	runDispatcher(t, cfg)
	j := newJob("base-exhaust", "m", "normal")
	j.Metadata = map[string]string{schemas.MetadataAttemptBase: "99"}
	r := e.waitResultAfter(j, 20*time.Second)
	if r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != schemas.CodeAttemptsExhausted || r.Attempt != schemas.MaxAttempt {
		t.Fatalf("terminal %+v (error %+v), want attempts_exhausted at attempt %d", r, r.Error, schemas.MaxAttempt)
	}
	data, _ := json.Marshal(e.waitResult(j.ID, 5*time.Second))
	if err := schemas.Validate(schemas.Result, data); err != nil {
		t.Fatalf("stored record %s: %v", data, err)
	}
}

// Two messages for one job — the same tenant and id at two priorities, which
// a raw publisher (no client, no publish expectation) can still store — run
// once: the dispatcher holds the first it pulls and terminates the other
// instead of taking it for a redelivery (which ran both, on two dispatchers,
// as attempt 1 and mixed the runs on the caller's stream). One assignment,
// one terminal record, one message terminated: the one that did not run.
// Mutation caught: check treating any delivery of a held job as a redelivery
// (no termination; the advisory never comes).
func TestSecondMessageForHeldJobTerminated(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	terminated := make(chan *nats.Msg, 4)
	sub, err := e.nc.ChanSubscribe("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED."+subjects.StreamJobs+".>", terminated)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	w := e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Block: true} })

	j := newJob("twice", "m", "low")
	c := e.listen(j.ReplyTo)
	seqOf := map[string]uint64{}
	for _, p := range []string{schemas.PriorityLow, schemas.PriorityHigh} {
		j.Priority = p
		data, _ := json.Marshal(j)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		pa, err := e.js.Publish(ctx, subjects.Job("", p, j.ID), data)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		seqOf[p] = pa.Sequence
	}
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))

	var adv struct {
		StreamSeq uint64 `json:"stream_seq"`
	}
	select {
	case m := <-terminated:
		if err := json.Unmarshal(m.Data, &adv); err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no message of the job was terminated")
	}
	w.Release()
	r := c.wait(t, 10*time.Second)
	if r.Status != schemas.StatusCompleted || r.Attempt != 1 {
		t.Fatalf("terminal %+v", r)
	}
	_, _, batches := w.Snapshot()
	if len(batches) != 1 || len(batches[0].Jobs) != 1 {
		t.Fatalf("%d assignments, want the job once: %+v", len(batches), batches)
	}
	ran := batches[0].Jobs[0].Job.Priority
	if adv.StreamSeq == seqOf[ran] || (adv.StreamSeq != seqOf[schemas.PriorityLow] && adv.StreamSeq != seqOf[schemas.PriorityHigh]) {
		t.Fatalf("terminated seq %d; the %s message (seq %d) ran; seqs %v", adv.StreamSeq, ran, seqOf[ran], seqOf)
	}
	if n := d.Metrics().DuplicateMsgs.Load(); n != 1 {
		t.Fatalf("%d duplicate messages counted, want 1", n)
	}
	waitFor(t, 10*time.Second, "JOBS empty: one message acked, the other terminated", func() bool {
		return e.streamMsgs(subjects.StreamJobs) == 0
	})
}
