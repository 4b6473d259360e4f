package dispatcher

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A cancel that CANCELS refused (full) must not stop a running job: its caller
// was told it failed (red team F-C: the dispatchers acted on the cancel subject
// itself, stored or not). Two jobs run on w1; CANCELS is full when "refused"
// is cancelled, then gets room and "stored" is cancelled: w1 must be asked to
// cancel "stored" only. The forwarded cancels come in order, so "refused"'s
// would have come first.
func TestRefusedCancelDoesNotStopARunningJob(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{CancelsMaxMsgs: 2})
	w := e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Block: true} })
	forwarded := make(chan *nats.Msg, 8)
	sub, err := e.nc.ChanSubscribe(subjects.WorkerCancel("w1"), forwarded)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cancelJob := func(id string) error {
		data, _ := json.Marshal(schemas.CancelMsg{JobID: id, RequestedAt: time.Now().UTC()})
		_, err := e.js.Publish(ctx, subjects.Cancel("", id), data)
		return err
	}
	for _, id := range []string{"filler1", "filler2"} {
		if err := cancelJob(id); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"refused", "stored"} {
		e.mustSubmit(newJob(id, "m", "normal"))
	}
	running := 0
	for running < 2 {
		select {
		case a := <-w.Assignments():
			running += len(a.Jobs)
		case <-ctx.Done():
			t.Fatalf("%d of 2 jobs running", running)
		}
	}
	// Running as the dispatcher sees it (the worker's acceptance handled):
	// what a cancel seen on the subject itself used to act on.
	waitFor(t, 10*time.Second, "both jobs running", func() bool {
		return d.Metrics().TransitionCount(StateDispatched, EvAccepted) == 2
	})
	if err := cancelJob("refused"); err == nil {
		t.Fatal("CANCELS took a third cancel past its bound")
	}
	s, err := e.js.Stream(ctx, subjects.StreamCancels)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Purge(ctx, jetstream.WithPurgeSubject(subjects.Cancel("", "filler1"))); err != nil {
		t.Fatal(err)
	}
	if err := cancelJob("stored"); err != nil {
		t.Fatal(err)
	}
	for {
		select {
		case m := <-forwarded:
			var c schemas.CancelMsg
			_ = json.Unmarshal(m.Data, &c)
			if c.JobID == "refused" {
				t.Fatal("the refused cancel was forwarded to the job's worker")
			}
			if c.JobID == "stored" {
				w.Release()
				return
			}
		case <-ctx.Done():
			t.Fatal("the stored cancel was not forwarded")
		}
	}
}
