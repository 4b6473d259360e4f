package chaos

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// The relay rows' checks: tenant b's jobs, and state read back with the
// admin handle (tenantattack_relay_test.go).

// --- tenant b's side.

func (r *relayer) submitB(ctx context.Context, id string, maxTokens int) error {
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err := r.prodB.Submit(sctx, &schemas.JobRequest{ID: id, Prompt: "tenant b job " + id, MaxTokens: maxTokens})
	return err
}

// waitB waits for b's record of id and says what is wrong with it, if anything.
func (r *relayer) waitB(ctx context.Context, id string) (*schemas.ResultMsg, string) {
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var res *schemas.ResultMsg
	if err := poll(wctx, 50*time.Millisecond, func() bool {
		var err error
		res, err = results.Fetch(wctx, r.at.s.adminJS, "b", id)
		return err == nil
	}); err != nil {
		return nil, "b's job " + id + " has no record"
	}
	switch {
	case res.Status != schemas.StatusCompleted || res.Tenant != "b" || strings.Contains(res.Text, "PWNED"):
		return res, fmt.Sprintf("b's job %s ended %s (tenant %q, error %+v, text %.60q)", id, res.Status, res.Tenant, res.Error, res.Text)
	case !r.at.mon.ranOn("b/"+id, res.WorkerID, res.Attempt):
		return res, fmt.Sprintf("b's record of %s names worker %q attempt %d, never assigned it", id, res.WorkerID, res.Attempt)
	}
	return res, ""
}

// bRuns: b's later job of the id the relay aimed at runs as b's own.
func (r *relayer) bRuns(id string) func(context.Context) (bool, string) {
	return func(ctx context.Context) (bool, string) {
		if err := r.submitB(ctx, id, 8); err != nil {
			return true, "b's own submit of " + id + " refused: " + err.Error()
		}
		if _, bad := r.waitB(ctx, id); bad != "" {
			return true, bad
		}
		return false, "b's later " + id + " completed as b's own"
	}
}

// bCompletes: b's running job the relay tried to cancel completes.
func (r *relayer) bCompletes(id string) func(context.Context) (bool, string) {
	return func(ctx context.Context) (bool, string) {
		if _, bad := r.waitB(ctx, id); bad != "" {
			return true, bad
		}
		return false, "b's " + id + " completed"
	}
}

// bRecord runs a short job of b's and returns its record's sequence.
func (r *relayer) bRecord(ctx context.Context, id string) uint64 {
	if err := r.submitB(ctx, id, 4); err != nil {
		r.at.t.Fatalf("b submits %s: %v", id, err)
	}
	if _, bad := r.waitB(ctx, id); bad != "" {
		r.at.t.Fatalf("relay target: %s", bad)
	}
	return r.lastSeq(ctx, subjects.StreamResults, subjects.Result("b", id))
}

// ensureBRecord: a purge row needs a record of b's to purge (an earlier
// purge that worked left none).
func (r *relayer) ensureBRecord(ctx context.Context, id string) {
	if len(r.records(ctx, "mlx.results.b.>")) == 0 {
		r.bRecord(ctx, id)
	}
}

// bRunning submits a long job of b's and waits until it streams tokens.
func (r *relayer) bRunning(ctx context.Context, id string) string {
	if err := r.submitB(ctx, id, 400); err != nil {
		r.at.t.Fatalf("b submits %s: %v", id, err)
	}
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := poll(wctx, 20*time.Millisecond, func() bool {
		return (r.at.mon.runningOn("b/"+id) != "" && r.at.mon.tokensOn(bus.ReplySubject("b", id)) > 0) || r.at.mon.resultWritten("b", id)
	}); err != nil {
		r.at.t.Fatalf("b's %s never ran: %v", id, err)
	}
	if r.at.mon.resultWritten("b", id) {
		r.at.t.Logf("relay: b's %s ended before the cancel relays; their rows are judged by CANCELS alone", id)
	}
	return id
}

// --- state read back with the admin handle.

func (r *relayer) info(ctx context.Context, stream string) *jetstream.StreamInfo {
	s, err := r.at.s.adminJS.Stream(ctx, stream)
	if err != nil {
		r.at.t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		r.at.t.Fatal(err)
	}
	return info
}

// lastSeq is the sequence of subj's last message in stream, 0 if none.
func (r *relayer) lastSeq(ctx context.Context, stream, subj string) uint64 {
	s, err := r.at.s.adminJS.Stream(ctx, stream)
	if err != nil {
		r.at.t.Fatal(err)
	}
	m, err := s.GetLastMsgForSubject(ctx, subj)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return 0
	}
	if err != nil {
		r.at.t.Fatal(err)
	}
	return m.Sequence
}

// storedOn: stream holds a message on subj after sequence after.
func (r *relayer) storedOn(stream, subj string, after uint64) func(context.Context) (bool, string) {
	return func(ctx context.Context) (bool, string) {
		s, err := r.at.s.adminJS.Stream(ctx, stream)
		if err != nil {
			return false, ""
		}
		m, err := s.GetLastMsgForSubject(ctx, subj)
		if err != nil || m.Sequence <= after {
			return false, ""
		}
		return true, fmt.Sprintf("%s stored %.120s on %s", stream, m.Data, subj)
	}
}

func anyOf(fs ...func(context.Context) (bool, string)) func(context.Context) (bool, string) {
	return func(ctx context.Context) (bool, string) {
		for _, f := range fs {
			if ok, what := f(ctx); ok {
				return true, what
			}
		}
		return false, ""
	}
}

// msgGone: the message at seq is no longer in stream.
func (r *relayer) msgGone(stream string, seq uint64) func(context.Context) (bool, string) {
	return func(ctx context.Context) (bool, string) {
		s, err := r.at.s.adminJS.Stream(ctx, stream)
		if err != nil {
			return false, ""
		}
		if _, err := s.GetMsg(ctx, seq); errors.Is(err, jetstream.ErrMsgNotFound) {
			return true, fmt.Sprintf("b's record at %s seq %d deleted", stream, seq)
		}
		return false, ""
	}
}

// records is RESULTS' subjects under filter and their message counts.
func (r *relayer) records(ctx context.Context, filter string) map[string]uint64 {
	s, err := r.at.s.adminJS.Stream(ctx, subjects.StreamResults)
	if err != nil {
		r.at.t.Fatal(err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(filter))
	if err != nil {
		r.at.t.Fatal(err)
	}
	return info.State.Subjects
}

// recordsGone: a record that was under filter in snap is gone.
func (r *relayer) recordsGone(filter string, snap map[string]uint64) func(context.Context) (bool, string) {
	if len(snap) == 0 {
		r.at.t.Errorf("relay harness: no record under %s to purge", filter)
	}
	return func(ctx context.Context) (bool, string) {
		now := r.records(ctx, filter)
		var gone []string
		for subj := range snap {
			if _, ok := now[subj]; !ok {
				gone = append(gone, subj)
			}
		}
		if len(gone) == 0 {
			return false, ""
		}
		return true, fmt.Sprintf("%d of %d records under %s purged (%s, ...)", len(gone), len(snap), filter, gone[0])
	}
}

// consumers is RESULTS' consumers: name -> deliver subject.
func (r *relayer) consumers(ctx context.Context) map[string]string {
	s, err := r.at.s.adminJS.Stream(ctx, subjects.StreamResults)
	if err != nil {
		r.at.t.Fatal(err)
	}
	out := map[string]string{}
	l := s.ListConsumers(ctx)
	for ci := range l.Info() {
		out[ci.Name] = ci.Config.DeliverSubject
	}
	return out
}
