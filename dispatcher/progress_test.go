package dispatcher

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

const forged = "<<FORGED>>"

// forge publishes, on nc, three token events of attempt 1 of job that would
// continue the text after w1's first three tokens (right seq and offset), on
// the job's reply subject — where any worker credential may publish — and on
// worker "w2"'s progress subject to d1. Neither is the worker the job runs on.
func forge(t *testing.T, nc *nats.Conn, job *schemas.JobRequest) {
	t.Helper()
	offset := len(fullText(3))
	for i := range 3 {
		ev, _ := json.Marshal(schemas.TokenEventMsg{Type: "token", JobID: job.ID, Attempt: 1, Seq: 3 + i, Delta: forged, Tokens: 4 + i, Offset: offset})
		offset += len(forged)
		for _, subj := range []string{job.ReplyTo, subjects.Progress("w2", "d1", job.Tenant)} {
			if err := nc.PublishRequest(subj, nc.NewInbox(), ev); err != nil { // as a worker sends it (subjects.Sent)
				t.Fatal(err)
			}
		}
	}
	// Handled by the server (and queued to the dispatcher) before w1 dies.
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

// TestForgedTokensDoNotReachResumeOrRecord: a job runs on w1, which sends three
// tokens; another worker forges token events for that very attempt (on the
// reply subject and on its own progress subject), then w1 dies silently. The
// retry resumes from w1's text only, and RESULTS holds no forged text — both
// for a retry that completes and for the record the dispatcher writes itself
// when the attempts are exhausted.
//
// Mutations caught: dispatcher/progress.go onProgress without the
// `j.workerID != wid` check (the w2 progress events count), and the removed
// per-job reply-subject tracking put back (the reply events count): red.
func TestForgedTokensDoNotReachResumeOrRecord(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name        string
		maxAttempts int
	}{{"retried", 3}, {"exhausted", 1}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, jsprov.Options{})
			w1 := e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Hang: true, HangAfter: 3} })
			cfg := testConfig("d1", e.connect("d1"))
			cfg.MaxAttempts = tc.maxAttempts
			d, _ := runDispatcher(t, cfg)
			j := newJob("forged-"+tc.name, "m", "normal")
			j.MaxTokens = 10
			c := e.listen(j.ReplyTo)
			e.mustSubmit(j)
			waitFor(t, 10*time.Second, "w1's three tokens", func() bool { return c.text() == fullText(3) })

			forge(t, e.connect("worker-w2"), j)
			w1.Stop() // silent death: no report, no record, no heartbeat
			var w3 *fakeWorker
			if tc.maxAttempts > 1 {
				w3 = e.startWorker("w3", 2, []string{"m"}, nil)
			}
			r := e.waitResult(j.ID, 15*time.Second)
			if strings.Contains(r.Text, forged) {
				t.Fatalf("RESULTS holds forged text: %q", r.Text)
			}
			// w2's three progress events, seen and refused (the reply
			// subject's are not even seen).
			if n := d.Metrics().ForgedRecords.Load(); n != 3 {
				t.Errorf("%d forgeries counted, want 3", n)
			}
			if w3 == nil {
				// The dispatcher's own record: what w1 sent, and nothing else.
				if r.Status != schemas.StatusFailed || r.Error == nil || r.Error.Code != schemas.CodeAttemptsExhausted || r.Text != fullText(3) {
					t.Fatalf("exhausted record %+v (error %+v), want text %q", r, r.Error, fullText(3))
				}
				return
			}
			if r.Status != schemas.StatusCompleted || r.Text != fullText(10) {
				t.Fatalf("result %+v, want text %q", r, fullText(10))
			}
			_, _, batches := w3.Snapshot()
			if len(batches) != 1 || len(batches[0].Jobs) != 1 {
				t.Fatalf("w3 batches %+v", batches)
			}
			aj := batches[0].Jobs[0]
			if aj.Attempt != 2 || aj.Resume == nil || aj.Resume.Text != fullText(3) || aj.Resume.CompletionTokens != 3 {
				t.Fatalf("retry %d resumes from %+v, want w1's %q", aj.Attempt, aj.Resume, fullText(3))
			}
		})
	}
}

// TestProgressPastTheCapStartsOver: the job's own worker sends a delta larger
// than a resume may carry (a quarter of the server's max payload, 64 KiB
// here). The dispatcher stops tracking the attempt instead of keeping the
// text, and the retry after the worker's silent death starts over: no resume,
// so the assignment stays within the payload.
//
// Mutation caught: dispatcher/progress.go track without the resumeCap case
// (the huge delta is kept, and resumed from): red.
func TestProgressPastTheCapStartsOver(t *testing.T) {
	t.Parallel()
	e := newEnvWith(t, natsserver.Options{MaxPayload: 64 << 10}, jsprov.Options{})
	huge := strings.Repeat("x", 20<<10) // past the 16 KiB cap, within the payload
	tokens := []string{"a ", "b ", huge, "c "}
	w1 := e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan {
		return jobPlan{Tokens: tokens, Hang: true, HangAfter: 3}
	})
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	if c := d.resumeCap(); c != 16<<10 {
		t.Fatalf("resume cap %d, want a quarter of the 64 KiB max payload", c)
	}
	j := newJob("huge", "m", "normal")
	j.MaxTokens = 10
	c := e.listen(j.ReplyTo)
	e.mustSubmit(j)
	waitFor(t, 10*time.Second, "w1's three tokens", func() bool { return c.text() == "a b "+huge })
	untracked := func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		jb := d.jobs[subjects.JobRef{ID: j.ID}.Key()]
		if jb == nil {
			t.Fatal("job not held")
		}
		if jb.cur.Len() > d.resumeCap() || jb.resumeSize+jb.curSize > d.resumeCap() {
			t.Fatalf("tracked %d bytes past the %d cap", jb.cur.Len(), d.resumeCap())
		}
		return jb.untracked
	}
	waitFor(t, 10*time.Second, "the attempt untracked", untracked)
	w1.Stop()
	w3 := e.startWorker("w3", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{Tokens: []string{"a ", "b ", "c "}} })
	r := e.waitResult(j.ID, 15*time.Second)
	if r.Status != schemas.StatusCompleted || r.Text != "a b c " {
		t.Fatalf("result %+v", r)
	}
	_, _, batches := w3.Snapshot()
	if len(batches) != 1 || batches[0].Jobs[0].Attempt != 2 || batches[0].Jobs[0].Resume != nil {
		t.Fatalf("retry on w3: %+v, want attempt 2 with no resume", batches)
	}
}

// jsonSize is what encoding/json writes for the string, less its quotes.
func TestJSONSizeMatchesEncodingJSON(t *testing.T) {
	t.Parallel()
	for _, s := range []string{"", "plain", `q"b\`, "nl\n\r\t\x00\x1f", "<a>&", "ünï 日本 🙂", "\u2028\u2029", "bad \xff\xfe \xe2\x82"} {
		enc, _ := json.Marshal(s)
		if got, want := jsonSize(s), len(enc)-2; got != want {
			t.Errorf("jsonSize(%q) = %d, encoding/json writes %d", s, got, want)
		}
	}
}

// TestProgressGapStartsOver: a progress event of the job's own worker is lost
// (LoseSeq). What the dispatcher tracked would have a hole, so the attempt is
// no longer tracked and the retry after the worker's silent death starts over
// rather than resume from text the caller never had in that shape.
//
// Mutation caught: dispatcher/progress.go track without the seq/offset case
// (the retry resumes from "t0 t2 "): red.
func TestProgressGapStartsOver(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	w1 := e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{LoseSeq: 1, Hang: true, HangAfter: 3} })
	runDispatcher(t, testConfig("d1", e.connect("d1")))
	j := newJob("gap", "m", "normal")
	j.MaxTokens = 10
	c := e.listen(j.ReplyTo)
	e.mustSubmit(j)
	waitFor(t, 10*time.Second, "w1's two delivered tokens", func() bool { return c.text() == tokenText(0)+tokenText(2) })
	w1.Stop()
	w3 := e.startWorker("w3", 2, []string{"m"}, nil)
	r := e.waitResult(j.ID, 15*time.Second)
	if r.Status != schemas.StatusCompleted || r.Text != fullText(10) {
		t.Fatalf("result %+v", r)
	}
	_, _, batches := w3.Snapshot()
	if len(batches) != 1 || batches[0].Jobs[0].Attempt != 2 || batches[0].Jobs[0].Resume != nil {
		t.Fatalf("retry on w3: %+v, want attempt 2 with no resume", batches)
	}
}

// A progress event larger than any tracked job's could be is dropped unread
// and counted: a worker credential flooding the one progress subscription
// with large bodies costs a length check each (red-team F-D), and the
// dispatcher goes on serving.
func TestOversizedProgressDroppedUnread(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{} })
	d, _ := runDispatcher(t, testConfig("d1", e.connect("d1")))
	// A job first: once it ended, the dispatcher's subscriptions are live.
	first := newJob("before-flood", "m", "normal")
	fc := e.listen(first.ReplyTo)
	e.mustSubmit(first)
	if r := fc.wait(t, 10*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("terminal %+v", r)
	}
	flood := e.connect("flood")
	big := make([]byte, d.resumeCap()+progressOverhead+1)
	for range 3 {
		if err := flood.PublishRequest(subjects.Progress("w1", "d1", "b"), flood.NewInbox(), big); err != nil {
			t.Fatal(err)
		}
	}
	if err := flood.Flush(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "three oversized events counted", func() bool { return d.Metrics().OversizedProgress.Load() == 3 })
	j := newJob("after-flood", "m", "normal")
	c := e.listen(j.ReplyTo)
	e.mustSubmit(j)
	if r := c.wait(t, 10*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("terminal %+v", r)
	}
}
