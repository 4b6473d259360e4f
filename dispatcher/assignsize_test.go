package dispatcher

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/breaker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// sizeMaxPayload is the server's max payload in these tests: 64 KiB, so a
// 40,000-character prompt fits an assignment alone but not beside another.
const sizeMaxPayload = 64 << 10

// queueThenServe stores jobs (all normal priority) on a 64 KiB server with a
// worker of slots up, then starts a dispatcher: it pulls them in one or a few
// fetches, and a batch short of its size waits (MaxWait, long here) while the
// consumer holds more, so its first batches are formed from the whole queue.
// prep may change the dispatcher before it runs.
func queueThenServe(t *testing.T, slots int, jobs []*schemas.JobRequest, prep func(*Dispatcher)) (*testEnv, *Dispatcher, *fakeWorker) {
	t.Helper()
	e := newEnvWith(t, natsserver.Options{MaxPayload: sizeMaxPayload}, jsprov.Options{})
	w := e.startWorker("w1", slots, []string{"m"}, nil)
	for _, j := range jobs {
		e.mustSubmit(j)
	}
	cfg := testConfig("d1", e.connect("d1"))
	cfg.MaxWait = 5 * time.Second
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if prep != nil {
		prep(d)
	}
	runNew(t, d)
	return e, d, w
}

// checkClean: every job completed at attempt 1, no assignment failed or was
// refused (none went over the payload: the client refuses those, and they
// are requeued as refused), and w1's breaker is closed.
func checkClean(t *testing.T, e *testEnv, d *Dispatcher, jobs []*schemas.JobRequest) {
	t.Helper()
	for _, j := range jobs {
		r := e.waitResult(j.ID, 15*time.Second)
		if r.Status != schemas.StatusCompleted || r.Attempt != 1 {
			t.Fatalf("%s: %s at attempt %d (%+v), want completed at attempt 1", j.ID, r.Status, r.Attempt, r.Error)
		}
	}
	m := d.Metrics()
	if n, f := m.AssignErrors.Load(), m.TransitionCount(StateDispatched, EvRefused); n != 0 || f != 0 {
		t.Fatalf("%d assignments failed, %d jobs refused: a batch went over the max payload", n, f)
	}
	d.mu.Lock()
	st := d.workers["w1"].br.State()
	d.mu.Unlock()
	if st != breaker.Closed {
		t.Fatalf("w1's breaker %s", st)
	}
}

// batchIDs lists each assignment w1 received as its jobs' ids, in the order
// the dispatcher formed them (its batch sequence: assignments travel
// concurrently, and may reach the worker in another order).
func batchIDs(w *fakeWorker) [][]string {
	_, _, batches := w.Snapshot()
	seq := func(b schemas.AssignmentMsg) uint64 {
		n, err := strconv.ParseUint(b.BatchID[strings.LastIndexByte(b.BatchID, '-')+1:], 36, 64)
		if err != nil {
			panic(err)
		}
		return n
	}
	slices.SortFunc(batches, func(a, b schemas.AssignmentMsg) int { return cmp.Compare(seq(a), seq(b)) })
	var out [][]string
	for _, b := range batches {
		var ids []string
		for _, aj := range b.Jobs {
			ids = append(ids, aj.Job.ID)
		}
		out = append(out, ids)
	}
	return out
}

func bigJob(id string) *schemas.JobRequest {
	j := newJob(id, "m", "normal")
	j.Prompt = strings.Repeat("x", 40_000)
	return j
}

// TestBatchesStayWithinMaxPayload: two queued jobs that each fit an
// assignment but not together (40 KB each, 64 KiB payload) go in two
// batches, and both complete at attempt 1 with no failed or refused
// assignment and w1's breaker untouched (the red-team round's batch of two
// 786 KB prompts on a 1 MiB server, scaled down).
//
// Mutation caught: the size check in schedule's collect loop removed (`if
// j.alone || c > budget` → `if j.alone`): one batch of both, which the client
// refuses, and the jobs are requeued as refused: red.
func TestBatchesStayWithinMaxPayload(t *testing.T) {
	t.Parallel()
	jobs := []*schemas.JobRequest{bigJob("big1"), bigJob("big2")}
	e, d, w := queueThenServe(t, 4, jobs, nil)
	checkClean(t, e, d, jobs)
	if got := fmt.Sprint(batchIDs(w)); got != "[[big1] [big2]]" {
		t.Fatalf("batches %s, want [[big1] [big2]]", got)
	}
}

// TestSmallJobsStillBatchTogether: eight small queued jobs go in one batch
// of eight: the size budget does not split what fits, nor does a scheduler
// pass between a fetch and its jobs' intake. The pull's credit (16) is split
// across priorities, so the eight come in two fetches (five, then three);
// the scheduler is run after each fetch, before its intake, as a heartbeat's
// wake-up would (a CI failure: [s0..s4] [s5 s6 s7]).
//
// Mutations caught: every member past the lead taken as over the budget
// (`c > budget` → `c >= 0`): eight batches of one: red. pullOnce storing
// the short fetch's "none behind" before its intake (the first
// `d.behind[p].Store(behind)` without its `if behind > 0`): five and three:
// red.
func TestSmallJobsStillBatchTogether(t *testing.T) {
	t.Parallel()
	var jobs []*schemas.JobRequest
	for i := range 8 {
		jobs = append(jobs, newJob(fmt.Sprintf("s%d", i), "m", "normal"))
	}
	var fetches atomic.Int32
	e, d, w := queueThenServe(t, 8, jobs, func(d *Dispatcher) {
		d.fetchedHook = func() { fetches.Add(1); d.schedule(time.Now()) }
	})
	checkClean(t, e, d, jobs)
	if fetches.Load() < 2 {
		t.Fatalf("the jobs came in %d fetch(es): the pass between fetch and intake was not tried", fetches.Load())
	}
	if got := fmt.Sprint(batchIDs(w)); got != "[[s0 s1 s2 s3 s4 s5 s6 s7]]" {
		t.Fatalf("batches %s, want one of all eight", got)
	}
}

// TestLastFetchsJobsLeaveAtOnce: seven queued jobs, eight slots, MaxWait 5 s.
// They come in two fetches (five, then two, the second short: none behind),
// and a scheduler pass right after the second intake must send all seven:
// nothing more is coming. The review found "none behind" stored after the
// intake's wake-up, so a pass in between waited MaxWait (or the next
// heartbeat) for jobs that were not there.
//
// Mutation caught: the behind of a short fetch stored in pullOnce after
// intakeAll (intakeAll(p, msgs, nil), then d.behind[p].Store(behind)): the
// pass leaves the seven queued: red.
func TestLastFetchsJobsLeaveAtOnce(t *testing.T) {
	t.Parallel()
	var jobs []*schemas.JobRequest
	for i := range 7 {
		jobs = append(jobs, newJob(fmt.Sprintf("l%d", i), "m", "normal"))
	}
	var fetches, waited atomic.Int32
	e, d, w := queueThenServe(t, 8, jobs, func(d *Dispatcher) {
		d.intakenHook = func() {
			fetches.Add(1)
			d.schedule(time.Now())
			d.mu.Lock()
			defer d.mu.Unlock()
			queued := 0
			for _, j := range d.jobs {
				if j.state == StateQueued {
					queued++
				}
			}
			if len(d.jobs) == len(jobs) && queued > 0 {
				waited.Add(1)
			}
		}
	})
	checkClean(t, e, d, jobs)
	if fetches.Load() < 2 {
		t.Fatalf("the jobs came in %d fetch(es): the pass after a short fetch was not tried", fetches.Load())
	}
	if waited.Load() > 0 {
		t.Fatal("a scheduler pass after the last fetch's intake left its jobs waiting for more")
	}
	if got := fmt.Sprint(batchIDs(w)); got != "[[l0 l1 l2 l3 l4 l5 l6]]" {
		t.Fatalf("batches %s, want one of all seven", got)
	}
}

// TestOversizeWaitsInOrder: big1, big2, small queued in that order. small
// would fit beside big1, but big2, ahead of it in the same priority, does
// not: small must not overtake it, so the batches are [big1], [big2 small].
//
// Mutation caught: a job past the budget skipped instead of closing its
// priority (`continue collect` → `continue`): [big1 small] [big2]: red.
func TestOversizeWaitsInOrder(t *testing.T) {
	t.Parallel()
	jobs := []*schemas.JobRequest{bigJob("big1"), bigJob("big2"), newJob("small", "m", "normal")}
	e, d, w := queueThenServe(t, 4, jobs, nil)
	checkClean(t, e, d, jobs)
	if got := fmt.Sprint(batchIDs(w)); got != "[[big1] [big2 small]]" {
		t.Fatalf("batches %s, want [[big1] [big2 small]]", got)
	}
}

// TestOverPayloadAssignmentIsRefusedNotFailed: should an assignment still go
// over the max payload (here the budget is forced far above it, as a server
// whose max payload shrank on a reconnect would), the client refuses it; that
// is no failure of the worker nor of the jobs: they are requeued as refused,
// go alone, and complete at attempt 1, with no assignment counted failed.
//
// Mutation caught: the ErrMaxPayload case removed from assign (the generic
// failure path: assign_failed, an attempt used, a breaker failure): red.
func TestOverPayloadAssignmentIsRefusedNotFailed(t *testing.T) {
	t.Parallel()
	jobs := []*schemas.JobRequest{bigJob("big1"), bigJob("big2")}
	e, d, w := queueThenServe(t, 4, jobs, func(d *Dispatcher) { d.assignBudget = 1 << 30 })
	for _, j := range jobs {
		if r := e.waitResult(j.ID, 15*time.Second); r.Status != schemas.StatusCompleted || r.Attempt != 1 {
			t.Fatalf("%s: %s at attempt %d (%+v), want completed at attempt 1", j.ID, r.Status, r.Attempt, r.Error)
		}
	}
	if n, f := d.Metrics().AssignErrors.Load(), d.Metrics().TransitionCount(StateDispatched, EvRefused); n != 0 || f != 2 {
		t.Fatalf("%d assignments failed, %d jobs refused; want 0 and 2", n, f)
	}
	if got := fmt.Sprint(batchIDs(w)); got != "[[big1] [big2]]" {
		t.Fatalf("batches %s, want [[big1] [big2]]", got)
	}
}

// TestJobThatCannotFitFailsAtIntake: a job whose body fits the bus as
// published (12,000 raw '<', 12 KB) but not once encoded for an assignment
// (encoding/json writes each '<' as six bytes: 72 KB, over 64 KiB) can never
// be assigned. It fails at intake, invalid_request, never offered to a worker
// (attempt 0), rather than be retried for ever.
//
// Mutation caught: the tooLargeToAssign check removed from intake (the job is
// offered, refused by the client, offered alone, then failed by the fallback
// at attempt 1): red.
func TestJobThatCannotFitFailsAtIntake(t *testing.T) {
	t.Parallel()
	e := newEnvWith(t, natsserver.Options{MaxPayload: sizeMaxPayload}, jsprov.Options{})
	e.startWorker("w1", 4, []string{"m"}, nil)
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	j := newJob("lt", "m", "normal")
	body := fmt.Sprintf(`{"id":%q,"model":"m","prompt":%q,"max_tokens":5,"reply_to":%q}`, j.ID, "PLACEHOLDER", j.ReplyTo)
	body = strings.Replace(body, "PLACEHOLDER", strings.Repeat("<", 12_000), 1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := e.js.Publish(ctx, subjects.Job("", "normal", j.ID), []byte(body)); err != nil {
		t.Fatal(err)
	}
	r := e.waitResult(j.ID, 15*time.Second)
	if r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != schemas.CodeInvalidRequest || r.Attempt != 0 {
		t.Fatalf("result %s at attempt %d (%+v), want failed invalid_request, never run", r.Status, r.Attempt, r.Error)
	}
	if n := d.Metrics().TransitionCount(StateQueued, EvDispatch); n != 0 {
		t.Fatalf("offered %d times", n)
	}
}

// TestLeadResumeDroppedWhenItWouldNotFit: a job of 52,000 characters fits an
// assignment (64 KiB payload), and its first attempt's 15,004 bytes of text
// are within the resume cap (16 KiB), but not both: w1 dies after sending
// them, and the retry on w3 goes without a resume (it starts over) rather
// than in an assignment the client would refuse. It completes at attempt 2,
// and nothing was refused.
//
// Mutation caught: launch without the resume drop (the assignment is refused
// as too large, again and again: the job never completes): red.
func TestLeadResumeDroppedWhenItWouldNotFit(t *testing.T) {
	t.Parallel()
	e := newEnvWith(t, natsserver.Options{MaxPayload: sizeMaxPayload}, jsprov.Options{})
	long := strings.Repeat("y", 15_000)
	w1 := e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan {
		return jobPlan{Tokens: []string{"a ", "b ", long, "c "}, Hang: true, HangAfter: 3}
	})
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	j := newJob("lr", "m", "normal")
	j.Prompt = strings.Repeat("x", 52_000)
	j.MaxTokens = 10
	e.mustSubmit(j)
	waitFor(t, 10*time.Second, "w1's three tokens tracked", func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		jb := d.jobs[subjects.JobRef{ID: j.ID}.Key()]
		return jb != nil && jb.curSize == len("a b ")+len(long) && !jb.untracked
	})
	w1.Stop()
	w3 := e.startWorker("w3", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Tokens: []string{"a ", "b ", "c "}} })
	r := e.waitResult(j.ID, 15*time.Second)
	if r.Status != schemas.StatusCompleted || r.Attempt != 2 || r.Text != "a b c " {
		t.Fatalf("result %s at attempt %d, text %.20q (%+v)", r.Status, r.Attempt, r.Text, r.Error)
	}
	_, _, batches := w3.Snapshot()
	if len(batches) != 1 || batches[0].Jobs[0].Attempt != 2 || batches[0].Jobs[0].Resume != nil {
		t.Fatalf("retry on w3: %d batches, want one of attempt 2 with no resume", len(batches))
	}
	if f := d.Metrics().TransitionCount(StateDispatched, EvRefused); f != 0 {
		t.Fatalf("%d jobs refused: the assignment went over the max payload", f)
	}
}

// Every job the producer client accepts (at most max payload −
// schemas.JobHeadroom encoded) fits an assignment of any dispatcher, whatever
// its id (a host name and a pid: at most ~270 characters).
// Mutation caught: assignEnvelope raised past the headroom.
func TestClientJobBoundFitsEveryAssignment(t *testing.T) {
	t.Parallel()
	did := strings.Repeat("h", 255) + "-4194304"
	for _, mp := range []int64{64 << 10, 1 << 20, 8 << 20} {
		if got, want := assignBudgetFor(mp, did)-perJobEnvelope, int(mp)-schemas.JobHeadroom; got < want {
			t.Fatalf("max payload %d: an assignment carries %d bytes of job, the client lets through %d", mp, got, want)
		}
	}
}
