package dispatcher

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// TestRelayedWorkerMessagesAreDropped replays the red team's N1 on a
// dispatcher: a terminal record, an attempt report and a progress event for
// a job running on w1, each written as a value of the models bucket (which
// every worker credential may write) and relayed by the server onto w1's
// done, attempt and progress subjects as the answer to a direct get (which
// every producer may send there). They arrive on the literal subjects, but
// without a reply subject: dropped and counted, and the job's record is the
// one its worker writes. Mutation caught: onDoneConcurrently without the
// subjects.Sent check (the relayed record is stored).
func TestRelayedWorkerMessagesAreDropped(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Block: true} })
	d, stop := runDispatcher(t, testConfig("d1", e.connect("d1")))
	defer stop()
	j := newJob("victim", "m", schemas.PriorityNormal)
	c := e.listen(j.ReplyTo)
	e.mustSubmit(j)
	waitFor(t, 10*time.Second, "the job running on w1", func() bool { return w.InFlight() == 1 })

	ctx := context.Background()
	kv, err := e.js.KeyValue(ctx, subjects.BucketModels)
	if err != nil {
		t.Fatal(err)
	}
	forged, _ := json.Marshal(schemas.ResultMsg{Type: "result", JobID: j.ID, Attempt: 1, Seq: 1, Status: schemas.StatusCompleted,
		FinishReason: "stop", Text: "RELAYED", WorkerID: "w1", Model: "m", FinishedAt: time.Now().UTC()})
	report, _ := json.Marshal(schemas.AttemptReportMsg{JobID: j.ID, Attempt: 1, WorkerID: "w1", ReportedAt: time.Now().UTC(),
		Error: schemas.ErrorInfo{Code: schemas.CodeGenerationFailed, Message: "relayed", Retryable: true}, Text: "RELAYED"})
	event := []byte(`{"type":"token","job_id":"` + j.ID + `","attempt":1,"seq":0,"delta":"RELAYED","tokens":1,"offset":0}`)
	for key, r := range map[string]struct {
		value []byte
		subj  string
	}{
		"relay-done":     {forged, subjects.Done("w1", "d1")},
		"relay-attempt":  {report, subjects.Attempt("w1")},
		"relay-progress": {event, subjects.Progress("w1", "d1", "")},
	} {
		if _, err := kv.Put(ctx, key, r.value); err != nil {
			t.Fatal(err)
		}
		get := "$JS.API.DIRECT.GET.KV_" + subjects.BucketModels + ".$KV." + subjects.BucketModels + "." + key
		if err := e.nc.PublishRequest(get, r.subj, []byte(`{"no_hdr":true}`)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 10*time.Second, "three relayed messages dropped", func() bool { return d.Metrics().Relayed.Load() == 3 })
	w.Release()
	res := c.wait(t, 15*time.Second)
	if res.Text == "RELAYED" || res.Status != schemas.StatusCompleted || res.Attempt != 1 {
		t.Fatalf("record %+v, want w1's own, attempt 1", res)
	}
	if n := d.Metrics().ForgedRecords.Load(); n != 0 {
		t.Fatalf("%d forgeries counted; the relays should not have reached the checks", n)
	}
}

// TestHandOverAnsweredOnlyInAnInbox replays the red team's R5-1: a worker
// hands over a record for a job it does not run, naming as its reply subject
// the job's RESULTS subject. The dispatcher refuses the record, and must not
// answer there either: its answer would go out with its own grants and be
// stored as the job's first record. Mutation caught: reply() answering any
// non-empty reply subject (RESULTS then holds the answer).
func TestHandOverAnsweredOnlyInAnInbox(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	d, stop := runDispatcher(t, testConfig("d1", e.connect("d1")))
	defer stop()
	evil := e.connect("evil")
	res, _ := json.Marshal(schemas.ResultMsg{Type: "result", JobID: "victim", Tenant: "b", Attempt: 1, Seq: 1, Status: schemas.StatusCompleted,
		FinishReason: "stop", Text: "x", WorkerID: "evil", Model: "m", FinishedAt: time.Now().UTC()})
	legit, _ := json.Marshal(schemas.ResultMsg{Type: "result", JobID: "other", Tenant: "b", Attempt: 1, Seq: 1, Status: schemas.StatusCompleted,
		FinishReason: "stop", Text: "x", WorkerID: "evil", Model: "m", FinishedAt: time.Now().UTC()})
	// A hand-over from an inbox is answered (unknown job) once the dispatcher
	// has subscribed.
	waitFor(t, 10*time.Second, "the dispatcher answering hand-overs", func() bool {
		_, err := evil.Request(subjects.Done("evil", "d1"), legit, time.Second)
		return err == nil
	})
	if err := evil.PublishRequest(subjects.Done("evil", "d1"), subjects.Result("b", "victim"), res); err != nil {
		t.Fatal(err)
	}
	// Handled either way: refused and counted, or answered into RESULTS.
	waitFor(t, 10*time.Second, "the hand-over handled", func() bool {
		return d.Metrics().ForgedRecords.Load() >= 1 || e.streamMsgs(subjects.StreamResults) > 0
	})
	if n := e.streamMsgs(subjects.StreamResults); n != 0 {
		t.Fatalf("RESULTS holds %d messages: the dispatcher answered on the victim's record subject", n)
	}
}
