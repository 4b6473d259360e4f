package dispatcher

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// TestDeepSchemaJobFailsOnceWithoutRunning: a job published raw (bypassing the
// producer client's validation) whose json_schema nests 3000 levels deep — the
// red-team F3 payload, which crashed the runtime and every job co-running on it
// — ends in exactly one failed invalid_request record naming $.json_schema, and
// no worker ever sees it. A valid job published after it runs, so the worker was
// there to take it. Mutation caught: the depth check left out of
// schemas.Validate (the job is assigned to the worker and completes).
func TestDeepSchemaJobFailsOnceWithoutRunning(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w := e.startWorker("w1", 2, []string{"m"}, nil)
	runDispatcher(t, testConfig("d1", e.connect("d1")))

	const id = "deep"
	deep := strings.Repeat(`{"type":"array","items":`, 2999) + `{"type":"string"}` + strings.Repeat(`}`, 2999)
	raw := `{"id":"` + id + `","model":"m","prompt":"x","max_tokens":4,"reply_to":"` + bus.ReplySubject("", id) + `","json_schema":` + deep + `}`
	c := e.listen(bus.ReplySubject("", id)) // fails the test on a second terminal event
	if _, err := e.js.Publish(context.Background(), subjects.Job("", "normal", id), []byte(raw)); err != nil {
		t.Fatal(err)
	}
	r := c.wait(t, 10*time.Second)
	if r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != schemas.CodeInvalidRequest || r.Attempt != 0 {
		t.Fatalf("deep job's result: %+v", r)
	}
	if !strings.Contains(r.Error.Message, "$.json_schema") {
		t.Fatalf("error %q does not name $.json_schema", r.Error.Message)
	}
	if rec := e.waitResult(id, 10*time.Second); rec.Status != schemas.StatusFailed || rec.Error.Code != schemas.CodeInvalidRequest {
		t.Fatalf("record: %+v", rec)
	}

	ok := e.waitResultAfter(newJob("fine", "m", "normal"), 10*time.Second)
	if ok.Status != schemas.StatusCompleted {
		t.Fatalf("valid job after it: %+v", ok)
	}
	waitFor(t, 10*time.Second, "JOBS empty", func() bool { return e.streamMsgs(subjects.StreamJobs) == 0 })
	if n := e.streamMsgs(subjects.StreamResults); n != 2 {
		t.Fatalf("RESULTS holds %d records, want one per job (2)", n)
	}
	if a, _, _ := w.Snapshot(); a[id] != 0 || a["fine"] != 1 {
		t.Fatalf("assignments %v: the deep job reached the worker, or the valid one did not", a)
	}
}
