package auth

import (
	"testing"

	"github.com/mlx-serving/mlx-serving/bus"
)

// Every action a credential can name outside its tenant or its worker id is
// refused by the server, whatever the message says: producer a cannot submit,
// cancel or reply as tenant b, read b's replies, write any result; a worker
// cannot write or read RESULTS, read others' cancels, or speak as another
// worker. Each case is one subject, so a widened grant shows up as one line.
// Mutation caught: granting the producer bus.SubjectJobsAll (or the worker
// bus.SubjectResultsAll / bus.SubjectCancelAll) in PermissionsFor.
func TestCredentialsRefusedOutsideTheirTenantOrWorker(t *testing.T) {
	t.Parallel()
	sb := startSecureBus(t)
	cases := []struct {
		role          Role
		name          string
		kind, subject string // kind "Publish" or "Subscription"
	}{
		{RoleProducer, "a", "Publish", bus.JobSubject("b", "normal", "x")},
		{RoleProducer, "a", "Publish", bus.JobSubject("default", "high", "x")},
		{RoleProducer, "a", "Publish", bus.CancelSubject("b", "x")},
		{RoleProducer, "a", "Publish", bus.ResultSubject("a", "x")},
		{RoleProducer, "a", "Publish", bus.ResultSubject("b", "x")},
		{RoleProducer, "a", "Publish", bus.ReplySubject("b", "x")},
		{RoleProducer, "a", "Publish", bus.ReplySubject("a", "x")},
		{RoleProducer, "a", "Publish", bus.DoneSubject("w1", "d1")},
		{RoleProducer, "a", "Publish", bus.AttemptSubject("w1")},
		{RoleProducer, "a", "Publish", bus.WorkerCancelSubject("w1")},
		{RoleProducer, "a", "Publish", bus.DLQSubject("a", "x")},
		{RoleProducer, "a", "Publish", "$JS.API.STREAM.PURGE.RESULTS"},
		{RoleProducer, "a", "Publish", "$JS.API.STREAM.MSG.DELETE.JOBS"},
		{RoleProducer, "a", "Publish", "$KV.mlx_workers.w1"},
		{RoleProducer, "a", "Subscription", bus.ReplyNamespace("b")},
		{RoleProducer, "a", "Subscription", bus.SubjectJobsAll},
		{RoleProducer, "a", "Subscription", bus.SubjectCancelAll},
		{RoleProducer, "a", "Subscription", bus.SubjectResultsAll},
		{RoleWorker, "w1", "Publish", bus.ResultSubject("a", "x")},
		{RoleWorker, "w1", "Publish", "$JS.API.STREAM.MSG.GET.RESULTS"},
		{RoleWorker, "w1", "Publish", "$JS.API.DIRECT.GET.RESULTS." + bus.ResultSubject("a", "x")},
		{RoleWorker, "w1", "Publish", bus.DoneSubject("w2", "d1")},
		{RoleWorker, "w1", "Publish", bus.AttemptSubject("w2")},
		{RoleWorker, "w1", "Publish", bus.JobSubject("a", "normal", "x")},
		{RoleWorker, "w1", "Publish", bus.CancelSubject("a", "x")},
		{RoleWorker, "w1", "Publish", bus.WorkerCancelSubject("w2")},
		{RoleWorker, "w1", "Subscription", bus.SubjectCancelAll},
		{RoleWorker, "w1", "Subscription", bus.WorkerCancelSubject("w2")},
		{RoleWorker, "w1", "Subscription", bus.SubjectResultsAll},
		{RoleWorker, "w1", "Subscription", bus.ReplyNamespace("a")},
		{RoleWorker, "w1", "Subscription", bus.SubjectDoneAll},
		{RoleGateway, "", "Publish", bus.ResultSubject("a", "x")},
		{RoleGateway, "", "Publish", bus.DoneSubject("w1", "d1")},
	}
	for _, c := range cases {
		cl := sb.connect(c.role, c.name)
		var err error
		if c.kind == "Publish" {
			err = cl.nc.Publish(c.subject, []byte(`{}`))
		} else {
			_, err = cl.nc.SubscribeSync(c.subject)
		}
		if err != nil {
			t.Fatal(err)
		}
		cl.violation(t, c.kind, c.subject)
		cl.nc.Close()
	}
}
