package chaos

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// resumeForgery: worker credential attacker forges token events for b's job
// running on the other worker — on b's reply subject, which every worker may
// publish on, and on its own progress subject to the dispatcher — and then the
// job's worker is SIGKILLed and started again under its id, so the job is
// retried from what the dispatcher tracked of the first attempt. Neither the
// retry's resume nor b's record may hold the forgery. (The dispatcher once
// tracked reply subjects: the red team's forged text reached RESULTS so.)
// Run after the drain: the kill would disturb the other rows' jobs.
func (at *attackTable) resumeForgery(ctx context.Context, bc *bClient, workers map[string]*busClient, did string) {
	// A job that ends before it is caught running (the model may stop
	// early) is replaced by another.
	var id, key, reply, victim string
	for try := 0; victim == ""; try++ {
		if try == 3 {
			at.t.Fatalf("none of b's jobs bresume0..2 was caught running with 5 token events out")
		}
		id = fmt.Sprintf("bresume%d", try)
		key, reply = "b/"+id, bus.ReplySubject("b", id)
		bc.submit(ctx, at.t, id, 2000)
		rctx, cancel := context.WithTimeout(ctx, time.Minute)
		err := poll(rctx, 20*time.Millisecond, func() bool {
			victim = at.mon.runningOn(key)
			return (victim != "" && at.mon.tokensOn(reply) >= 5) || at.mon.resultWritten("b", id)
		})
		cancel()
		if err != nil {
			at.t.Fatalf("%s never ran: %v (running on %q, %d token events, offers %+v, client's terminal %+v)",
				key, err, victim, at.mon.tokensOn(reply), at.mon.offered(key), bc.terminal(id))
		}
		if at.mon.resultWritten("b", id) {
			victim = ""
		}
	}
	attempt := at.mon.attemptOf(key)
	attacker := "w1"
	if victim == "w1" {
		attacker = "w2"
	}
	c := workers[attacker]
	action := fmt.Sprintf("forged token events for %s running on %s (reply subject and %s), then %s SIGKILLed",
		key, victim, subjects.Progress(attacker, did, "b"), victim)
	before := at.forged()
	for i := range 3 {
		ev := mustJSON(schemas.TokenEventMsg{Type: "token", JobID: id, Attempt: attempt, Seq: 5000 + i, Delta: "<<PWNED>>", Tokens: 1})
		if err := c.nc.Publish(reply, ev); err != nil {
			at.t.Fatal(err)
		}
		// With a reply subject, as a worker sends progress (subjects.Sent).
		if err := c.nc.PublishRequest(subjects.Progress(attacker, did, "b"), c.nc.NewInbox(), ev); err != nil {
			at.t.Fatal(err)
		}
	}
	if err := c.nc.Flush(); err != nil {
		at.t.Fatal(err)
	}
	counted := at.waitForged(before, 2*time.Second)

	w := at.s.workers[victim]
	w.kill()
	since := time.Now()
	if err := w.start(); err != nil {
		at.t.Fatalf("restart %s: %v", victim, err)
	}
	if err := at.s.waitWorkerReady(ctx, w, since); err != nil {
		at.t.Fatalf("%s not ready after restart: %v", victim, err)
	}
	if err := poll(ctx, 100*time.Millisecond, func() bool { return bc.terminal(id) != nil }); err != nil {
		at.add(c.name, action, false, "b's client saw no terminal")
		return
	}
	res, err := results.Fetch(ctx, at.s.adminJS, "b", id)
	if err != nil {
		at.add(c.name, action, false, "no record: "+err.Error())
		return
	}
	offers := at.mon.offered(key)
	var retry *assignOffer
	for i := range offers {
		if offers[i].attempt > attempt {
			retry = &offers[i]
		}
	}
	switch {
	case strings.Contains(res.Text, "PWNED"):
		at.add(c.name, action, false, fmt.Sprintf("SUCCEEDED: b's record (attempt %d) holds the forged text", res.Attempt))
	case retry != nil && strings.Contains(retry.resume, "PWNED"):
		at.add(c.name, action, false, fmt.Sprintf("SUCCEEDED: the retry on %s resumed from forged text", retry.worker))
	case res.Status != schemas.StatusCompleted:
		at.add(c.name, action, false, fmt.Sprintf("b's job ended %s (%+v)", res.Status, res.Error))
	case retry == nil:
		at.add(c.name, action, true, "inconclusive: the job was not retried")
	case !counted:
		at.add(c.name, action, false, "not in resume or record, but the progress events were not counted as forged")
	default:
		at.add(c.name, action, true, fmt.Sprintf("ignored, counted forged; retried on %s from %d bytes of %s's own text, record clean",
			retry.worker, len(retry.resume), victim))
	}
}
