package dispatcher

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Requests queue per worker and slots go to the workers in turn; past its
// cap on what waits a worker's request is not taken at all.
// Mutations caught: startLocked not passing the turn on (w1's queue served
// to the end first: w2 after w1's third); offer without the cap (w1-4 taken).
func TestTakeQueueTakesWorkersInTurn(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	d, err := New(testConfig("d1", e.connect("d1")))
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var taken []string
	release := make(chan struct{})
	q := newTakeQueue(d, "test", 1, func(m *nats.Msg) func(context.Context) {
		mu.Lock()
		taken = append(taken, string(m.Data))
		first := len(taken) == 1
		mu.Unlock()
		if first {
			<-release // hold the one slot while the rest queue
		}
		return nil
	}, func(string) int { return 2 })
	msg := func(wid, name string) *nats.Msg {
		return &nats.Msg{Subject: subjects.Done(wid, "d1"), Reply: "_INBOX.x", Data: []byte(name)}
	}
	q.offer(msg("w1", "w1-1"))
	waitFor(t, 5*time.Second, "the first request taken", func() bool { mu.Lock(); defer mu.Unlock(); return len(taken) == 1 })
	for i := 2; i <= 5; i++ {
		q.offer(msg("w1", fmt.Sprintf("w1-%d", i))) // 2 and 3 queue; 4 and 5 are past the cap
	}
	q.offer(msg("w2", "w2-1"))
	close(release)
	want := []string{"w1-1", "w1-2", "w2-1", "w1-3"}
	waitFor(t, 5*time.Second, "the queued requests taken", func() bool { mu.Lock(); defer mu.Unlock(); return len(taken) >= len(want) })
	d.awaitWrites()
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(taken, want) {
		t.Fatalf("taken %v, want %v", taken, want)
	}
}

// One worker credential flooding its own done and adopt subjects with large
// bogus records does not hold other workers' records: before, the 32 shared
// slots filled with the flood and another tenant's job had no record within
// 20 s (red team round 18, F1). A check under a live flood, with a bound
// loose enough for a loaded 2-core machine (at 10 s it failed 1 run in 4
// with two busy loops beside it: the flood's bytes delay every message on
// the dispatcher's connection, RELIABILITY round 18). It no longer catches a
// FIFO take queue on this machine (records then came after 1.8-4.5 s, in
// session 13): the turns and the cap are held deterministically by
// TestTakeQueueTakesWorkersInTurn, and busy by the tests below.
func TestOneWorkersFloodDoesNotHoldOthersRecords(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w2", 4, []string{"m"}, nil)
	var running <-chan struct{}
	cfg := testConfig("d1", e.connect("d1"))
	cfg.Logger, running = logSignal(logRunning)
	runDispatcher(t, cfg)
	waitClosed(t, running, 10*time.Second, "dispatcher running")
	res := schemas.ResultMsg{Type: "result", JobID: "nope", Tenant: "b", Attempt: 1, Seq: 1, Status: schemas.StatusCompleted,
		FinishReason: schemas.FinishStop, Text: strings.Repeat("<", 150000), WorkerID: "w1", Model: "m", FinishedAt: time.Now().UTC()}
	data, err := json.Marshal(res)
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	var flood sync.WaitGroup
	var sent atomic.Int64
	for _, subj := range []string{subjects.Done("w1", "d1"), subjects.Adopt("w1"), subjects.Done("w1", "d1")} {
		atk := e.connect("w1")
		flood.Go(func() {
			for ctx.Err() == nil {
				m := nats.NewMsg(subj)
				m.Data, m.Reply = data, atk.NewInbox()
				m.Header.Set(subjects.HeaderPlacement, "1796058649.00")
				if atk.PublishMsg(m) != nil {
					return
				}
				sent.Add(1)
				time.Sleep(10 * time.Millisecond) // ~300 a second over the three: more than the old slots could decode

			}
		})
	}
	t.Cleanup(func() { stop(); flood.Wait() })
	waitFor(t, 10*time.Second, "the flood under way", func() bool { return sent.Load() > 500 })
	for i := range 3 {
		j := newJob(fmt.Sprintf("under-flood-%d", i), "m", "normal")
		start := time.Now()
		e.mustSubmit(j)
		// 60 s: a clean-clone CI run (session 16, every package testing side
		// by side on 2 cores) had the third record later than 30 s.
		if r := e.waitResult(j.ID, 60*time.Second); r.Status != schemas.StatusCompleted {
			t.Fatalf("job %s ended %s under the flood", j.ID, r.Status)
		}
		t.Logf("job %s: record after %v", j.ID, time.Since(start))
	}
	t.Logf("%d flood requests sent", sent.Load())
}

// An honest worker's stale tries of one hand-over (its requests timed out
// while the dispatcher did not answer) fill its cap; the live hand-over of
// another job behind them is answered busy, to be tried again, never unknown,
// which the worker takes as final: the completed record was dropped and the
// job ran again (red team round 18, second pass, F1).
// Mutation caught: offer answering unknown past the cap.
func TestStaleTriesDoNotDropALiveHandOver(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	nc := e.connect("d1")
	d, err := New(testConfig("d1", nc))
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	d.handOverHook = func() { <-release } // a dispatcher that does not get to them
	t.Cleanup(func() { close(release); d.awaitWrites() })
	d.mu.Lock()
	d.workers["w1"] = &workerView{id: "w1", br: d.newBreaker(), othersReply: -1, mine: 2} // jobs A and D run on w1
	d.mu.Unlock()
	if _, err := nc.Subscribe(subjects.DoneForDispatcher("d1"), d.onDoneConcurrently); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	w1 := e.connect("w1")
	send := func(job string) *nats.Subscription {
		inbox := w1.NewInbox()
		answers, err := w1.SubscribeSync(inbox)
		if err != nil {
			t.Fatal(err)
		}
		res := schemas.ResultMsg{Type: "result", JobID: job, Attempt: 1, Seq: 1, Status: schemas.StatusCompleted,
			FinishReason: schemas.FinishStop, Text: "x", WorkerID: "w1", Model: "m", FinishedAt: time.Now().UTC()}
		data, err := json.Marshal(res)
		if err != nil {
			t.Fatal(err)
		}
		if err := w1.PublishMsg(&nats.Msg{Subject: subjects.Done("w1", "d1"), Reply: inbox, Data: data}); err != nil {
			t.Fatal(err)
		}
		return answers
	}
	for range perWorkerTakes + 4 { // job A's tries: on its slots, then 2 jobs + 2 of slack waiting
		send("job-A")
	}
	live := send("job-D")
	m, err := live.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatalf("job D's hand-over past the cap: no answer: %v", err)
	}
	var reply schemas.FinishReplyMsg
	if err := json.Unmarshal(m.Data, &reply); err != nil || reply.Status != schemas.FinishBusy {
		t.Fatalf("job D's hand-over past the cap answered %s, want busy", m.Data)
	}
}

// Workers that finish every job the moment they get it (the bench's ceiling
// phase: two of 16 slots, one-token jobs) are never answered busy. A guard,
// not a reproduction: the cap once counted what was on slots too, and in the
// bench's dispatcher process honest hand-overs were answered busy (a job's
// end is counted when its hand-over is taken, before the take leaves its
// slot), the fake workers did not try again, and the ceiling fell from
// ~1,000 to 17 jobs/s; in process here that race did not show.
func TestInstantWorkersAreNeverAnsweredBusy(t *testing.T) {
	t.Parallel()
	e := newEnvWith(t, natsserver.Options{}, jsprov.Options{JobsMaxMsgs: 1 << 20})
	opts := fakeWorkerOptions{HeartbeatEvery: time.Second, Quiet: true}
	w1 := e.startWorkerWith("w1", 16, []string{"m"}, nil, opts)
	w2 := e.startWorkerWith("w2", 16, []string{"m"}, nil, opts)
	cfg := testConfig("d1", e.connect("d1"))
	cfg.MaxWait = 2 * time.Millisecond
	d, _ := runDispatcher(t, cfg)
	const n = 600
	for i := range n {
		j := newJob(fmt.Sprintf("instant-%04d", i), "m", "normal")
		j.MaxTokens = 1
		data, err := json.Marshal(j)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.js.PublishAsync(subjects.Job(j.Tenant, "normal", j.ID), data); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-e.js.PublishAsyncComplete():
	case <-time.After(30 * time.Second):
		t.Fatal("the jobs were not all stored")
	}
	waitFor(t, 60*time.Second, "every job ended", func() bool { return d.Metrics().JobsPulled.Load() >= n && e.streamMsgs(subjects.StreamJobs) == 0 })
	if b := d.Metrics().AnsweredBusy.Load(); b != 0 {
		t.Fatalf("%d honest hand-overs answered busy", b)
	}
	// The workers' side: no hand-over ended on busy. Other refusals are not
	// this test's: a full suite run in session 13 saw 12 (what they were was
	// not recorded then; 26 runs alone, two busy loops beside them, saw
	// none). A worker declared lost under load, its attempts' late
	// hand-overs answered unknown, would look like that; they are logged.
	for _, r := range append(w1.Stats().Refused, w2.Stats().Refused...) {
		if strings.HasSuffix(r, ":"+schemas.FinishBusy) {
			t.Fatalf("a worker's hand-over ended busy: %s", r)
		}
	}
	if errs := w1.Errors() + w2.Errors(); errs != 0 {
		t.Logf("the workers saw %d hand-overs not stored: %v %v", errs, w1.Stats().Refused, w2.Stats().Refused)
	}
}
