package fakeworker_test

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// TestServesAnAssignment: accepted with the free slots left, tokens on the
// reply subject and the same on the progress subject, the record handed to the
// dispatcher that placed the job, and a batch larger than the free slots
// answered full.
func TestServesAnAssignment(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	w, err := fakeworker.Start(testenv.Context(t, 10*time.Second), b.Connect(t, "worker"), fakeworker.Options{ID: "w1", Slots: 2, Models: []string{"m"}, Errorf: t.Errorf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Stop)
	if _, err := b.Workers.Get(testenv.Context(t, 5*time.Second), "w1"); err != nil {
		t.Fatalf("no heartbeat: %v", err)
	}
	tokens := make(chan schemas.TokenEventMsg, 8)
	if _, err := b.Conn.Subscribe("reply.j1", func(m *nats.Msg) {
		var ev schemas.TokenEventMsg
		_ = json.Unmarshal(m.Data, &ev)
		tokens <- ev
	}); err != nil {
		t.Fatal(err)
	}
	// The same events, for the dispatcher that placed the job.
	progress := make(chan schemas.TokenEventMsg, 8)
	if _, err := b.Conn.Subscribe(subjects.Progress("w1", "d1", ""), func(m *nats.Msg) {
		var ev schemas.TokenEventMsg
		_ = json.Unmarshal(m.Data, &ev)
		progress <- ev
	}); err != nil {
		t.Fatal(err)
	}
	records := make(chan schemas.ResultMsg, 1)
	if _, err := b.Conn.Subscribe(subjects.Done("w1", "d1"), func(m *nats.Msg) {
		var r schemas.ResultMsg
		_ = json.Unmarshal(m.Data, &r)
		records <- r
		data, _ := json.Marshal(schemas.FinishReplyMsg{JobID: r.JobID, Status: schemas.FinishStored})
		_ = m.Respond(data)
	}); err != nil {
		t.Fatal(err)
	}
	_ = b.Conn.Flush()
	assign := func(jobs ...string) schemas.AssignmentReplyMsg {
		t.Helper()
		a := schemas.AssignmentMsg{BatchID: "b", DispatcherID: "d1"}
		for _, id := range jobs {
			a.Jobs = append(a.Jobs, schemas.AssignedJob{Attempt: 1, Job: schemas.JobRequest{ID: id, Model: "m", MaxTokens: 3, ReplyTo: "reply." + id}})
		}
		data, _ := json.Marshal(a)
		m, err := b.Conn.Request(subjects.Assign("w1"), data, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var rep schemas.AssignmentReplyMsg
		_ = json.Unmarshal(m.Data, &rep)
		return rep
	}
	if rep := assign("x1", "x2", "x3"); rep.Status != schemas.AssignFull {
		t.Fatalf("three jobs for two slots: %+v", rep)
	}
	if rep := assign("j1"); rep.Status != schemas.AssignAccepted || rep.FreeSlots != 1 {
		t.Fatalf("one job: %+v", rep)
	}
	for i := range 3 {
		if ev := <-tokens; ev.Delta != fakeworker.TokenText(i) || ev.Seq != i {
			t.Fatalf("token %d: %+v", i, ev)
		}
		select {
		case ev := <-progress:
			if ev.Delta != fakeworker.TokenText(i) || ev.Seq != i || ev.JobID != "j1" {
				t.Fatalf("progress %d: %+v", i, ev)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no progress event %d", i)
		}
	}
	select {
	case r := <-records:
		if r.Text != fakeworker.FullText(3) || r.Status != schemas.StatusCompleted || r.WorkerID != "w1" {
			t.Fatalf("record %+v", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no hand-over")
	}
	if st := w.Stats(); st.Fulls != 1 || st.MaxBatch != 1 {
		t.Fatalf("stats %+v", st)
	}
	waitFree := time.Now().Add(5 * time.Second)
	for w.InFlight() != 0 && time.Now().Before(waitFree) {
		time.Sleep(5 * time.Millisecond)
	}
	if w.InFlight() != 0 || w.Errors() != 0 {
		t.Fatalf("in flight %d, errors %d", w.InFlight(), w.Errors())
	}
}

// TestDirectRetries: in Direct mode a crashed attempt is retried here, resuming
// where the report says (offset and token count go on) or, with StartOver,
// from offset 0; the record lands in RESULTS and its event on the reply subject.
// Mutations caught: runDirect not setting next.Resume (the resumed attempt
// starts at offset 0); attempt not setting Offset (every offset 0).
func TestDirectRetries(t *testing.T) {
	t.Parallel()
	story := []string{"Once ", "upon ", "a ", "time"}
	for _, tc := range []struct {
		startOver bool
		offset    int // of attempt 2's first event
		tokens    int // its token count
	}{{false, 10, 3}, {true, 0, 1}} {
		t.Run(fmt.Sprintf("start over %v", tc.startOver), func(t *testing.T) {
			t.Parallel()
			b := testenv.StartBus(t, jsprov.Options{})
			plans := []fakeworker.Plan{{Tokens: story, Crash: 2, StartOver: tc.startOver}, {Tokens: story}}
			w, err := fakeworker.Start(testenv.Context(t, 10*time.Second), b.Connect(t, "worker"), fakeworker.Options{ID: "w1", Slots: 2, Models: []string{"m"},
				Direct: true, Errorf: t.Errorf, Plan: func(aj schemas.AssignedJob) fakeworker.Plan { return plans[aj.Attempt-1] }})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(w.Stop)
			events := make(chan []byte, 16)
			if _, err := b.Conn.Subscribe("reply.j1", func(m *nats.Msg) { events <- m.Data }); err != nil {
				t.Fatal(err)
			}
			data, _ := json.Marshal(schemas.JobRequest{ID: "j1", Model: "m", Prompt: "p", ReplyTo: "reply.j1"})
			if err := b.Conn.Publish(subjects.Job("", schemas.PriorityNormal, "j1"), data); err != nil {
				t.Fatal(err)
			}
			var toks []schemas.TokenEventMsg
			var res schemas.ResultMsg
			for res.Type == "" {
				select {
				case d := <-events:
					var tok schemas.TokenEventMsg
					_ = json.Unmarshal(d, &tok)
					if tok.Type == "token" {
						toks = append(toks, tok)
					} else {
						_ = json.Unmarshal(d, &res)
					}
				case <-time.After(5 * time.Second):
					t.Fatalf("no terminal after %+v", toks)
				}
			}
			if len(toks) < 3 || toks[1].Offset != 5 || toks[2].Attempt != 2 || toks[2].Offset != tc.offset || toks[2].Tokens != tc.tokens || toks[2].Seq != 0 {
				t.Fatalf("events %+v", toks)
			}
			stored, err := results.Fetch(testenv.Context(t, 5*time.Second), b.JS, "", "j1")
			if err != nil || stored.Text != "Once upon a time" || stored.Attempt != 2 || res.Text != stored.Text || stored.FinishReason != "stop" {
				t.Fatalf("stored %+v (%v), event %+v", stored, err, res)
			}
		})
	}
}
