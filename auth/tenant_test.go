package auth

import (
	"testing"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
)

// Every action a credential can name outside its tenant or its worker id is
// refused by the server, whatever the message says: producer a cannot submit,
// cancel or reply as tenant b, read b's replies, write any result; a worker
// cannot write or read RESULTS, read others' cancels, or speak as another
// worker. Each case is one subject, so a widened grant shows up as one line.
// Mutation caught: granting the producer subjects.JobsAll (or the worker
// subjects.ResultsAll / subjects.CancelAll / subjects.ProgressAll, or the
// dispatcher a subscription on mlx.reply.>) in PermissionsFor.
func TestCredentialsRefusedOutsideTheirTenantOrWorker(t *testing.T) {
	t.Parallel()
	sb := startSecureBus(t)
	cases := []struct {
		role          Role
		name          string
		kind, subject string // kind "Publish" or "Subscription"
	}{
		{RoleProducer, "a", "Publish", subjects.Job("b", "normal", "x")},
		{RoleProducer, "a", "Publish", subjects.Job("default", "high", "x")},
		{RoleProducer, "a", "Publish", subjects.Cancel("b", "x")},
		{RoleProducer, "a", "Publish", subjects.Result("a", "x")},
		{RoleProducer, "a", "Publish", subjects.Result("b", "x")},
		{RoleProducer, "a", "Publish", bus.ReplySubject("b", "x")},
		{RoleProducer, "a", "Publish", bus.ReplySubject("a", "x")},
		{RoleProducer, "a", "Publish", subjects.Done("w1", "d1")},
		{RoleProducer, "a", "Publish", subjects.Attempt("w1")},
		{RoleProducer, "a", "Publish", subjects.Progress("w1", "d1", "a")},
		{RoleProducer, "a", "Publish", subjects.WorkerCancel("w1")},
		{RoleProducer, "a", "Publish", subjects.DLQ("a", "x")},
		{RoleProducer, "a", "Publish", "$JS.API.STREAM.PURGE.RESULTS"},
		{RoleProducer, "a", "Publish", "$JS.API.STREAM.MSG.DELETE.JOBS"},
		{RoleProducer, "a", "Publish", "$KV.mlx_workers.w1"},
		{RoleProducer, "a", "Subscription", subjects.ReplyNamespace("b")},
		{RoleProducer, "a", "Subscription", subjects.JobsAll},
		{RoleProducer, "a", "Subscription", subjects.CancelAll},
		{RoleProducer, "a", "Subscription", subjects.ResultsAll},
		{RoleWorker, "w1", "Publish", subjects.Result("a", "x")},
		{RoleWorker, "w1", "Publish", "$JS.API.STREAM.MSG.GET.RESULTS"},
		{RoleWorker, "w1", "Publish", "$JS.API.DIRECT.GET.RESULTS." + subjects.Result("a", "x")},
		{RoleWorker, "w1", "Publish", subjects.Done("w2", "d1")},
		{RoleWorker, "w1", "Publish", subjects.Attempt("w2")},
		{RoleWorker, "w1", "Publish", subjects.Progress("w2", "d1", "a")},
		{RoleWorker, "w1", "Subscription", subjects.ProgressAll},
		{RoleWorker, "w1", "Publish", subjects.Job("a", "normal", "x")},
		{RoleWorker, "w1", "Publish", subjects.Cancel("a", "x")},
		{RoleWorker, "w1", "Publish", subjects.WorkerCancel("w2")},
		{RoleWorker, "w1", "Subscription", subjects.CancelAll},
		{RoleWorker, "w1", "Subscription", subjects.WorkerCancel("w2")},
		{RoleWorker, "w1", "Subscription", subjects.ResultsAll},
		{RoleWorker, "w1", "Subscription", subjects.ReplyNamespace("a")},
		{RoleWorker, "w1", "Subscription", subjects.DoneAll},
		{RoleGateway, "", "Publish", subjects.Result("a", "x")},
		{RoleGateway, "", "Publish", subjects.Done("w1", "d1")},
		{RoleGateway, "", "Publish", subjects.Progress("w1", "d1", "a")},
		// The dispatcher tracks a running attempt only from the progress
		// subjects; it has no business reading reply subjects.
		{RoleDispatcher, "", "Subscription", subjects.ReplyNamespace("a")},
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
