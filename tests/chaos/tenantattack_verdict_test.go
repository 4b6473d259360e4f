package chaos

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/auth"
	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// The replay squat, the end checks on tenant b's jobs, and the report.

// replaySquat: an admin replays one of b's dead letters; producer a, which
// knows the job's id and can guess the DLQ sequence, published a job of its
// own first with the Nats-Msg-Id replay will use. The replay must still run
// b's job.
func (at *attackTable) replaySquat(ctx context.Context, c *busClient) {
	action := "squat b's replay Nats-Msg-Id, then admin replays b's dead letter"
	id := "bdead"
	job := schemas.JobRequest{ID: id, Model: at.s.modelID(), Prompt: "tenant b dead-lettered job", MaxTokens: 8, Tenant: "b",
		Priority: schemas.PriorityNormal, ReplyTo: bus.ReplySubject("b", id)}
	rec := schemas.DLQRecordMsg{Job: job, Reason: "attempts_exhausted", Attempts: 3,
		LastError: schemas.ErrorInfo{Code: "runtime_error", Message: "stand-in dead letter written by the test"}, DeadAt: time.Now().UTC(), DispatcherID: "test"}
	ack, err := at.s.adminJS.Publish(ctx, subjects.DLQ("b", id), mustJSON(rec))
	if err != nil {
		at.t.Fatal(err)
	}
	squat := map[string]any{"id": "atksquat", "model": at.s.modelID(), "prompt": "squat", "max_tokens": 4, "tenant": "a", "reply_to": bus.ReplySubject("a", "atksquat")}
	if _, err := c.js.Publish(ctx, subjects.Job("a", "normal", "atksquat"), mustJSON(squat),
		jetstream.WithMsgID(fmt.Sprintf("%s.replay.%d", id, ack.Sequence))); err != nil {
		at.add(c.name, action, true, "refused: "+err.Error())
		return
	}
	cmd := exec.CommandContext(ctx, at.s.mlxBin, "replay", "--id", id, "--nats", at.s.nats.urlList())
	cmd.Env = append(os.Environ(), at.s.credEnv(auth.RoleAdmin, "")...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		at.t.Fatalf("replay: %v\n%s", err, out)
	}
	row := at.add(c.name, action, false, "pending")
	at.later = append(at.later, func(ctx context.Context) {
		wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		var res *schemas.ResultMsg
		_ = poll(wctx, 250*time.Millisecond, func() bool {
			res, err = results.Fetch(wctx, at.s.adminJS, "b", id)
			return err == nil
		})
		if res != nil && res.Status == schemas.StatusCompleted {
			row.refused, row.outcome = true, "b's replayed job completed"
			return
		}
		dlq, _ := at.s.adminJS.Stream(ctx, subjects.StreamDLQ)
		_, derr := dlq.GetLastMsgForSubject(ctx, subjects.DLQ("b", id))
		row.outcome = fmt.Sprintf("SUCCEEDED: replay said %q; b's job has no record (%v), dead letter gone (%v), JOBS never got it: lost",
			strings.TrimSpace(string(out)), err, derr != nil)
	})
}

func (at *attackTable) runLater(ctx context.Context) {
	for _, f := range at.later {
		f(ctx)
	}
}

// checkB: every one of b's jobs has exactly one record, completed, written
// from the worker that ran it, with text no attacker wrote; b's client ended
// with that record; b's reply subjects carried exactly one terminal event not
// an attacker's; no record under b for an id only an attacker used.
func (at *attackTable) checkB(ctx context.Context, bc *bClient) {
	t := at.t
	counts, err := resultCounts(ctx, at.s.adminJS)
	if err != nil {
		t.Fatal(err)
	}
	bc.mu.Lock()
	ids := append([]string(nil), bc.ids...)
	bc.mu.Unlock()
	var lost, dup []string
	for _, id := range ids {
		subj := subjects.Result("b", id)
		switch n := counts[subj]; {
		case n == 0:
			lost = append(lost, id)
			continue
		case n > 1:
			dup = append(dup, fmt.Sprintf("%s: %d records", id, n))
		}
		res, err := results.Fetch(ctx, at.s.adminJS, "b", id)
		if err != nil {
			t.Errorf("b/%s: %v", id, err)
			continue
		}
		if res.Status != schemas.StatusCompleted || strings.Contains(res.Text, "PWNED") || res.Tenant != "b" {
			t.Errorf("b/%s ended %s (tenant %q, worker %s, error %+v) with text %q: not b's own completed run", id, res.Status, res.Tenant, res.WorkerID, res.Error, res.Text)
		}
		if !at.mon.ranOn("b/"+id, res.WorkerID, res.Attempt) {
			t.Errorf("b/%s: record names worker %s attempt %d, which was never assigned that attempt", id, res.WorkerID, res.Attempt)
		}
		if got := bc.terminal(id); got == nil || got.Text != res.Text || got.Status != res.Status {
			if _, known := knownHoles["worker-w1: forged terminal event on b's reply subject of "+id]; !known || got == nil {
				t.Errorf("b/%s: b's client ended with %+v, the record is %q", id, got, res.Text)
			}
		}
		if n := at.mon.honestTerminals(bus.ReplySubject("b", id)); n != 1 {
			dup = append(dup, fmt.Sprintf("%s: %d terminal events on its reply subject", id, n))
		}
	}
	var foreign []string
	for subj := range counts {
		// bdead is b's too: the replay row judges it.
		if id, ok := strings.CutPrefix(subj, subjects.ResultsPrefix+".b."); ok && !slicesContains(ids, id) && id != "bdead" {
			foreign = append(foreign, id)
		}
	}
	sort.Strings(foreign)
	t.Logf("tenant b: %d jobs, %d lost, %d duplicated, %d records for ids b never used", len(ids), len(lost), len(dup), len(foreign))
	if len(lost) > 0 {
		t.Errorf("LOST: b's jobs without a record: %v", lost)
	}
	if len(dup) > 0 {
		t.Errorf("DUPLICATED: %v", dup)
	}
	if len(foreign) > 0 {
		t.Errorf("records under tenant b for ids only an attacker used: %v", foreign)
	}
}

func slicesContains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// report logs the table and fails the test for every action that succeeded.
func (at *attackTable) report() {
	t := at.t
	strict := os.Getenv("CHAOS_ATTACK_STRICT") == "1"
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "actor\taction\tverdict\toutcome")
	refused, holes, controls := 0, 0, 0
	for _, r := range at.rows {
		verdict := "refused"
		switch {
		case r.control:
			verdict = "control ok"
			controls++
		case r.refused:
			refused++
		default:
			key := r.actor + ": " + r.action
			if why, known := knownHoles[key]; known {
				holes++
				verdict = "HOLE (known)"
				t.Logf("HOLE (known): %s — %s: %s", key, r.outcome, why)
				if strict {
					t.Errorf("CHAOS_ATTACK_STRICT: %s — %s", key, r.outcome)
				}
			} else {
				verdict = "SUCCEEDED"
				t.Errorf("ACTION SUCCEEDED: %s — %s", key, r.outcome)
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", r.actor, r.action, verdict, r.outcome)
	}
	tw.Flush()
	t.Logf("%d actions: %d refused, %d known holes, %d succeeded (and %d controls allowed)\n%s",
		len(at.rows)-controls, refused, holes, len(at.rows)-controls-refused-holes, controls, b.String())
}

// bClient is tenant b's client: each job submitted with bus.SubmitStream and
// read to its terminal event, as a service would.
