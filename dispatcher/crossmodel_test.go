package dispatcher

import (
	"fmt"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// One tenant's backlog for a busy model does not keep another model's jobs
// off its idle worker, at any priority: held jobs of a model with no free
// slot do not count against the dispatcher's credit. Before, 13 held jobs of
// a 1-slot model used it all, and the idle 4-slot model's jobs had no record
// after 15 s (red team round 18, tenant F3).
// Mutation caught: credit counting every held job (b's jobs not run).
func TestABusyModelsBacklogDoesNotHoldOtherModels(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	wx := e.startWorker("wx", 1, []string{"mx"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Block: true} })
	e.startWorker("wy", 4, []string{"my"}, nil)
	for i := range 30 {
		j := newJob(fmt.Sprintf("a%d", i), "mx", "low")
		j.Tenant, j.ReplyTo = "a", bus.ReplySubject("a", j.ID)
		e.mustSubmit(j)
	}
	pris := []string{"high", "normal", "low"}
	for _, p := range pris {
		j := newJob("b-"+p, "my", p)
		j.Tenant, j.ReplyTo = "b", bus.ReplySubject("b", j.ID)
		e.mustSubmit(j)
	}
	runDispatcher(t, testConfig("d1", e.connect("d1")))
	t.Cleanup(wx.Release) // before the dispatcher's stop, which drains
	for _, p := range pris {
		start := time.Now()
		if r := e.waitTenantResult("b", "b-"+p, 15*time.Second); r.Status != schemas.StatusCompleted || r.WorkerID != "wy" {
			t.Fatalf("b's %s job ended %s on %q", p, r.Status, r.WorkerID)
		}
		t.Logf("b's %s job: record after %v", p, time.Since(start))
	}
}
