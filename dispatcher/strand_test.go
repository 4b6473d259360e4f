package dispatcher

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Jobs left in JOBS at or below their consumer's ack floor (acked, but the
// store failed to delete them: the operator round's full disk) are never
// delivered again, yet counted as queued and keep their ids. The sweep
// removes those whose job has its record and leaves any other. The state the
// disk left is made here with a consumer whose floor starts past two stored
// jobs, on a JOBS with limits retention (a work queue refuses such a
// consumer); what the sweep reads — the floor, the stream's messages, RESULTS
// — is the same.
// Mutations caught: sweepStranded without its results.Stored check (the
// orphan without a record is removed too), or comparing against floor-1
// (the job at the floor stays).
func TestStrandedJobsBelowTheAckFloorAreRemoved(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := e.js.DeleteStream(ctx, subjects.StreamJobs); err != nil {
		t.Fatal(err)
	}
	if _, err := e.js.CreateStream(ctx, jetstream.StreamConfig{Name: subjects.StreamJobs, Subjects: subjects.JobsStream(),
		Retention: jetstream.LimitsPolicy, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	orphan, done := newJob("strand-orphan", "m", "normal"), newJob("strand-done", "m", "normal")
	e.mustSubmit(orphan)
	e.mustSubmit(done) // stored last: its sequence is the floor
	rec := &schemas.ResultMsg{Type: "result", JobID: done.ID, Attempt: 1, Status: schemas.StatusCompleted, FinishReason: "stop",
		Text: "done", Model: "m", WorkerID: "w1", FinishedAt: time.Now().UTC()}
	if err := results.Record(ctx, e.js, rec); err != nil {
		t.Fatal(err)
	}
	stream, err := e.js.Stream(ctx, subjects.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	si, err := stream.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cons, err := e.js.CreateConsumer(ctx, subjects.StreamJobs, jetstream.ConsumerConfig{
		Durable: "strand-test", FilterSubject: subjects.JobsConsumerFilter("normal"), AckPolicy: jetstream.AckExplicitPolicy,
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: si.State.LastSeq + 1,
	})
	if err != nil {
		t.Fatal(err)
	}
	d, err := New(testConfig("d1", e.connect("d1")))
	if err != nil {
		t.Fatal(err)
	}
	d.jobsStream = stream
	if n := d.sweepStranded(ctx, cons, subjects.JobsPriority("normal")); n != 1 {
		t.Fatalf("removed %d, want 1 (the job with its record)", n)
	}
	if n := e.streamMsgs(subjects.StreamJobs); n != 1 {
		t.Fatalf("JOBS holds %d messages, want 1 (the job without a record)", n)
	}
	if _, err := stream.GetMsg(ctx, si.State.LastSeq); err == nil {
		t.Fatal("the job with its record is still in JOBS")
	}
	if d.Metrics().StrandedRemoved.Load() != 1 {
		t.Fatalf("counted %d removed", d.Metrics().StrandedRemoved.Load())
	}
	// A second look finds nothing more to do.
	if n := d.sweepStranded(ctx, cons, subjects.JobsPriority("normal")); n != 0 {
		t.Fatalf("second look removed %d", n)
	}
}
