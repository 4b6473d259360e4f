package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// The ledger is the bookkeeping of the kill tests (TestWholeStackKill,
// TestNATSKilledWhileWorkersRun): which jobs the bus accepted (Submit returned a
// PubAck — the moment the system promises the job will end in exactly one
// terminal record), in which round, and what the wire showed. It deliberately
// uses only the public bus API (Producer.Submit, Producer.Result, the stream
// and subject names of package bus), never a hand-written job subject: job
// subjects are being re-shaped, the promise is not.

// ledgerJob is one job the test tried to submit.
type ledgerJob struct {
	id    string
	round int
	// accepted: Submit returned nil, so the job is in JOBS, durably
	// (sync_interval: always). Otherwise its outcome is unknown (the publish
	// may or may not have been stored) and the system promised nothing.
	accepted bool
}

type ledger struct {
	t     testing.TB
	seed  uint64
	model string
	nc    *nats.Conn // the producer's connection
	p     *bus.Client
	js    jetstream.JetStream
	h     *history // the wire, as a monitor on mlx.> saw it (for duplicates and a lost job's story)

	mu      sync.Mutex
	jobs    []*ledgerJob
	byRound map[int][]*ledgerJob

	// trigger counts RESULTS writes seen on the wire for jobs whose id starts
	// with prefix (a core subscriber sees a publish to a stream's subject
	// whether or not the store then keeps it) and closes fire at the target.
	trigMu sync.Mutex
	trig   *resultTrigger
}

type resultTrigger struct {
	prefix        string
	count, target int
	fire          chan struct{}
}

// newLedger subscribes the wire monitors on a connection of its own, so a
// subscriber that falls behind cannot slow the producer.
func newLedger(t testing.TB, ns *natsSet, model string, seed uint64) *ledger {
	t.Helper()
	pnc := connectAll(t, ns, "ledger-producer")
	p, err := bus.NewClient(pnc)
	if err != nil {
		t.Fatal(err)
	}
	l := &ledger{t: t, seed: seed, model: model, nc: pnc, p: p, js: p.JetStream(), h: newHistory(), byRound: map[int][]*ledgerJob{}}
	mnc := connectAll(t, ns, "ledger-monitor")
	l.h.monitor(t, mnc)
	sub, err := mnc.Subscribe(subjects.ResultsAll, func(m *nats.Msg) {
		id := m.Subject[strings.LastIndexByte(m.Subject, '.')+1:]
		l.trigMu.Lock()
		defer l.trigMu.Unlock()
		if tr := l.trig; tr != nil && strings.HasPrefix(id, tr.prefix) {
			if tr.count++; tr.count == tr.target {
				close(tr.fire)
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := sub.SetPendingLimits(-1, -1); err != nil {
		t.Fatal(err)
	}
	if err := mnc.Flush(); err != nil {
		t.Fatal(err)
	}
	return l
}

// whenResults returns a channel closed as soon as the wire has shown n RESULTS
// writes for jobs of round r: the kill then lands while that batch's results
// are being written — some finished, most not — on a loaded machine as on an
// idle one, where a fixed delay might land before the first result or after
// the last (after a restart the previous rounds' leftovers run first).
func (l *ledger) whenResults(r, n int) <-chan struct{} {
	tr := &resultTrigger{prefix: l.jobPrefix(r), target: n, fire: make(chan struct{})}
	l.trigMu.Lock()
	l.trig = tr
	l.trigMu.Unlock()
	return tr.fire
}

func (l *ledger) jobPrefix(r int) string { return fmt.Sprintf("sk%05dr%02dj", l.seed%100000, r) }

// submitBatch submits n jobs of round r one after another until ctx ends (the
// kill cancels it: what is not submitted by then is simply not part of the
// batch). started is closed after the first submit returns.
func (l *ledger) submitBatch(ctx context.Context, r, n int, rng *rand.Rand, started chan<- struct{}) {
	tokens := make([]int, n)
	for i := range tokens {
		tokens[i] = 4 + rng.IntN(13) // small: results must be written continuously
	}
	for i := range n {
		if ctx.Err() != nil {
			return
		}
		seed := int64(i)
		j := &ledgerJob{id: fmt.Sprintf("%s%03d", l.jobPrefix(r), i), round: r}
		job := &schemas.JobRequest{ID: j.id, Model: l.model, Prompt: fmt.Sprintf("stack kill round %d job %d", r, i),
			MaxTokens: tokens[i], Sampling: schemas.Sampling{Seed: &seed}}
		_, err := l.p.Submit(ctx, job)
		j.accepted = err == nil
		l.mu.Lock()
		l.jobs = append(l.jobs, j)
		l.byRound[r] = append(l.byRound[r], j)
		l.mu.Unlock()
		if i == 0 && started != nil {
			close(started)
		}
	}
}

// roundStats is what the ledger knows of one round.
type roundStats struct {
	round                           int
	accepted, unknown               int
	doneBefore                      int // accepted jobs with a RESULTS write on the wire before the fault
	completed, failed, dlq, retried int
	lost, dup, stuck, dlqOnly       []string
}

// snapshotDone counts the accepted jobs of round r the wire has seen a RESULTS
// write for (stored or not: exactly what a core-NATS observer would act on).
func (l *ledger) snapshotDone(r int) (done, accepted int) {
	l.mu.Lock()
	jobs := append([]*ledgerJob(nil), l.byRound[r]...)
	l.mu.Unlock()
	l.h.mu.Lock()
	defer l.h.mu.Unlock()
	for _, j := range jobs {
		if !j.accepted {
			continue
		}
		accepted++
		if w := l.h.wire[j.id]; w != nil && len(w.resultWrites) > 0 {
			done++
		}
	}
	return done, accepted
}

// drain waits until every accepted job has its record, or JOBS has been empty
// for a while (then no record will come: every job still owed one is lost).
// A job whose delivery was interrupted is redelivered one ack wait (30 s in
// the binaries) after that delivery, so the drain must allow more than that.
func (l *ledger) drain(ctx context.Context) error {
	emptySince := time.Time{}
	return poll(ctx, 250*time.Millisecond, func() bool {
		counts, err := resultCounts(ctx, l.js) // one request, not one per job
		if err != nil {
			return false
		}
		missing := 0
		for _, j := range l.accepted() {
			if counts[subjects.Result("", j.id)] == 0 {
				missing++
			}
		}
		n, err := streamMsgs(ctx, l.js, subjects.StreamJobs)
		if err != nil {
			return false
		}
		if n > 0 {
			emptySince = time.Time{}
			return false
		}
		if missing == 0 {
			return true
		}
		if emptySince.IsZero() {
			emptySince = time.Now()
		}
		return time.Since(emptySince) > 5*time.Second
	})
}

func (l *ledger) accepted() []*ledgerJob {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []*ledgerJob
	for _, j := range l.jobs {
		if j.accepted {
			out = append(out, j)
		}
	}
	return out
}

// verify checks every accepted job: exactly one record in RESULTS (a DLQ entry
// next to a failed record is accounted for), at most one terminal event on its
// reply subject across every restart. lost: no record, no DLQ entry and no
// longer in JOBS — the system acked a job it never finished. stuck: still in
// JOBS after the drain. dlqOnly: dead-lettered without a record (the caller
// never learns the outcome; fails the test as well).
func (l *ledger) verify(ctx context.Context, doneBefore map[int]int) ([]*roundStats, error) {
	counts, err := resultCounts(ctx, l.js)
	if err != nil {
		return nil, err
	}
	queued, err := subjectsOf(ctx, l.js, subjects.StreamJobs)
	if err != nil {
		return nil, err
	}
	dlqStream, err := l.js.Stream(ctx, subjects.StreamDLQ)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	rounds := make([]int, 0, len(l.byRound))
	for r := range l.byRound {
		rounds = append(rounds, r)
	}
	l.mu.Unlock()
	sort.Ints(rounds)
	var out []*roundStats
	for _, r := range rounds {
		rs := &roundStats{round: r, doneBefore: doneBefore[r]}
		l.mu.Lock()
		jobs := append([]*ledgerJob(nil), l.byRound[r]...)
		l.mu.Unlock()
		for _, j := range jobs {
			if !j.accepted {
				rs.unknown++
				continue
			}
			rs.accepted++
			_, dlqErr := dlqStream.GetLastMsgForSubject(ctx, subjects.DLQ("", j.id))
			inDLQ := dlqErr == nil
			if inDLQ {
				rs.dlq++
			}
			res, err := l.p.Result(ctx, j.id)
			switch {
			case errors.Is(err, bus.ErrNoResult):
				story := l.story(j.id)
				switch {
				case queued[j.id] > 0:
					rs.stuck = append(rs.stuck, j.id+" ("+story+")")
				case inDLQ:
					rs.dlqOnly = append(rs.dlqOnly, j.id+" ("+story+")")
				default:
					rs.lost = append(rs.lost, j.id+" ("+story+")")
				}
				continue
			case err != nil:
				return nil, fmt.Errorf("result %s: %w", j.id, err)
			}
			if res.Status == schemas.StatusCompleted {
				rs.completed++
			} else {
				rs.failed++
			}
			if res.Attempt > 1 {
				rs.retried++
			}
			if n := counts[subjects.Result("", j.id)]; n != 1 {
				rs.dup = append(rs.dup, fmt.Sprintf("%s: %d records in RESULTS", j.id, n))
			}
			l.h.mu.Lock()
			if w := l.h.wire[j.id]; w != nil && len(w.replyTerminals) > 1 {
				rs.dup = append(rs.dup, fmt.Sprintf("%s: %d terminal events on the reply subject (attempts %v)", j.id, len(w.replyTerminals), attempts(w.replyTerminals)))
			}
			l.h.mu.Unlock()
		}
		out = append(out, rs)
	}
	return out, nil
}

func (l *ledger) story(id string) string {
	l.h.mu.Lock()
	defer l.h.mu.Unlock()
	w := l.h.wire[id]
	if w == nil {
		return "nothing on the wire"
	}
	return w.story(l.h.start)
}

// subjectsOf counts a stream's messages by the last token of their subject (the
// job id, whatever the tokens before it are).
func subjectsOf(ctx context.Context, js jetstream.JetStream, stream string) (map[string]uint64, error) {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return nil, err
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(">"))
	if err != nil {
		return nil, err
	}
	out := map[string]uint64{}
	for subj, n := range info.State.Subjects {
		out[subj[strings.LastIndexByte(subj, '.')+1:]] += n
	}
	return out, nil
}

// report logs one row per round and fails the test on any lost, duplicated,
// stuck or dead-lettered-without-record job.
func (l *ledger) report(rounds []*roundStats) {
	l.t.Helper()
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "round\taccepted\tunknown\tdone@fault\tcompleted\tfailed\tdlq\tretried\tlost\tdup\tstuck\tdlq-only\t")
	var lost, dup, stuck, dlqOnly []string
	for _, r := range rounds {
		fmt.Fprintf(tw, "%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t\n", r.round, r.accepted, r.unknown, r.doneBefore,
			r.completed, r.failed, r.dlq, r.retried, len(r.lost), len(r.dup), len(r.stuck), len(r.dlqOnly))
		lost, dup, stuck, dlqOnly = append(lost, r.lost...), append(dup, r.dup...), append(stuck, r.stuck...), append(dlqOnly, r.dlqOnly...)
	}
	tw.Flush()
	l.t.Logf("seed %d (replay with CHAOS_SEED=%d), per round:\n%s", l.seed, l.seed, b.String())
	fail := func(what string, ids []string) {
		if len(ids) > 0 {
			l.t.Errorf("%s: %d:\n  %s", what, len(ids), strings.Join(ids, "\n  "))
		}
	}
	fail("LOST (accepted, acked out of JOBS, no RESULTS record, no DLQ entry)", lost)
	fail("DUPLICATE terminals", dup)
	fail("STUCK in JOBS after the drain", stuck)
	fail("dead-lettered without a RESULTS record", dlqOnly)
}

// checkStatus runs `mlx-serving status --json`, the operator's view, and checks
// it agrees with the ledger once everything drained: nothing queued, nothing in
// flight (heartbeats lag, so this is polled), and RESULTS/DLQ hold exactly the
// records of this test's jobs.
func (l *ledger) checkStatus(ctx context.Context, mlxBin string, ns *natsSet) {
	l.t.Helper()
	var withRecord int
	l.mu.Lock()
	jobs := append([]*ledgerJob(nil), l.jobs...)
	l.mu.Unlock()
	for _, j := range jobs { // unknown-outcome jobs may have a record too
		if _, err := l.p.Result(ctx, j.id); err == nil {
			withRecord++
		}
	}
	dlq, err := streamMsgs(ctx, l.js, subjects.StreamDLQ)
	if err != nil {
		l.t.Error(err)
		return
	}
	var rep struct {
		Queued   map[string]uint64 `json:"queued"`
		InFlight int               `json:"in_flight"`
		DLQ      uint64            `json:"dlq"`
		Results  uint64            `json:"results"`
	}
	var last string
	err = poll(ctx, 500*time.Millisecond, func() bool {
		out, err := exec.CommandContext(ctx, mlxBin, "status", "--json", "--nats", ns.urlList()).Output()
		if err != nil {
			last = err.Error()
			return false
		}
		last = strings.TrimSpace(string(out))
		if json.Unmarshal(out, &rep) != nil {
			return false
		}
		return rep.InFlight == 0
	})
	if err != nil {
		l.t.Errorf("status never showed 0 in flight: %v (last: %s)", err, last)
		return
	}
	var queued uint64
	for _, n := range rep.Queued {
		queued += n
	}
	l.t.Logf("status --json: queued %v, in flight %d, results %d, dlq %d", rep.Queued, rep.InFlight, rep.Results, rep.DLQ)
	if queued != 0 || rep.Results != uint64(withRecord) || rep.DLQ != uint64(dlq) {
		l.t.Errorf("status disagrees: queued %d (want 0), results %d (want %d: the test's jobs with a record), dlq %d (want %d)",
			queued, rep.Results, withRecord, rep.DLQ, dlq)
	}
}

// killConfig sizes the kill tests: CHAOS_FULL=1 selects the full version,
// CHAOS_ROUNDS and CHAOS_SEED override.
func killConfig(t *testing.T, short, full int) (rounds int, seed uint64) {
	rounds = short
	if os.Getenv("CHAOS_FULL") == "1" {
		rounds = full
	}
	if v := os.Getenv("CHAOS_ROUNDS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("CHAOS_ROUNDS=%q", v)
		}
		rounds = n
	}
	seed = uint64(time.Now().UnixNano())
	if v := os.Getenv("CHAOS_SEED"); v != "" {
		s, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("CHAOS_SEED=%q", v)
		}
		seed = s
	}
	return rounds, seed
}
