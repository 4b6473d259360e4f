package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// callerRecord is everything one caller saw of its job, in the order
// bus.JobStream handed it over.
type callerRecord struct {
	id       string
	producer int

	submitted   time.Time
	submitTries int
	submitErr   error // the last submit error when the job never got in
	watched     bool  // the submit's outcome was unknown; the caller re-attached with bus.Watch

	events    []eventRec
	text      strings.Builder
	terminals int
	result    *schemas.ResultMsg
	restarted int
	rewinds   int // attempts that started over, rewinding the caller's text
	missed    int
	recovered bool
	streamErr error
	finished  time.Time
}

type eventRec struct {
	attempt, seq int
	restarted    bool
	missed       int
	terminal     bool
}

// history collects the callers' records and what a monitor subscribed to
// mlx.> saw on the wire: RESULTS writes (including refused ones, which core
// subscribers see too), assignments, token and terminal events on reply
// subjects, attempt reports — each stamped with its arrival at the monitor.
type history struct {
	mu      sync.Mutex
	callers map[string]*callerRecord
	wire    map[string]*wireRec
	dropped atomic.Int64 // messages the monitor's subscription lost
	done    atomic.Int64 // callers with a terminal
	start   time.Time
}

type wireRec struct {
	resultWrites   []wireEv // publishes on mlx.results.<tenant>.<id>
	assigns        []wireEv
	tokens         []wireEv
	replyTerminals []wireEv
	attemptReports []wireEv
}

type wireEv struct {
	at      time.Time
	attempt int
	seq     int
	status  string
	worker  string
}

func newHistory() *history {
	return &history{callers: map[string]*callerRecord{}, wire: map[string]*wireRec{}, start: time.Now()}
}

func (h *history) wireFor(id string) *wireRec {
	w := h.wire[id]
	if w == nil {
		w = &wireRec{}
		h.wire[id] = w
	}
	return w
}

// monitor subscribes to every mlx.* subject on nc.
func (h *history) monitor(t testing.TB, nc *nats.Conn) {
	t.Helper()
	sub, err := nc.Subscribe("mlx.>", h.observe)
	if err != nil {
		t.Fatal(err)
	}
	if err := sub.SetPendingLimits(-1, -1); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if n, err := sub.Dropped(); err == nil {
			h.dropped.Add(int64(n))
		}
		_ = sub.Unsubscribe()
	})
}

func (h *history) observe(m *nats.Msg) {
	now := time.Now()
	subj := m.Subject
	switch {
	case strings.HasPrefix(subj, "mlx.results."):
		var r schemas.ResultMsg
		if json.Unmarshal(m.Data, &r) != nil {
			return
		}
		h.mu.Lock()
		w := h.wireFor(r.JobID)
		w.resultWrites = append(w.resultWrites, wireEv{at: now, attempt: r.Attempt, seq: r.Seq, status: r.Status, worker: r.WorkerID})
		h.mu.Unlock()
	case strings.HasPrefix(subj, "mlx.worker.") && strings.HasSuffix(subj, ".assign"):
		var a schemas.AssignmentMsg
		if json.Unmarshal(m.Data, &a) != nil {
			return
		}
		worker := strings.TrimSuffix(strings.TrimPrefix(subj, "mlx.worker."), ".assign")
		h.mu.Lock()
		for _, j := range a.Jobs {
			w := h.wireFor(j.Job.ID)
			w.assigns = append(w.assigns, wireEv{at: now, attempt: j.Attempt, worker: worker})
		}
		h.mu.Unlock()
	case subj == subjects.Attempt(subjects.WorkerOf(subj)):
		var r schemas.AttemptReportMsg
		if json.Unmarshal(m.Data, &r) != nil {
			return
		}
		h.mu.Lock()
		w := h.wireFor(r.JobID)
		w.attemptReports = append(w.attemptReports, wireEv{at: now, attempt: r.Attempt, seq: r.Seq, status: r.Error.Code, worker: r.WorkerID})
		h.mu.Unlock()
	case strings.HasPrefix(subj, subjects.ReplyPrefix+"."):
		var probe struct {
			Type    string `json:"type"`
			JobID   string `json:"job_id"`
			Attempt int    `json:"attempt"`
			Seq     int    `json:"seq"`
			Status  string `json:"status"`
			Worker  string `json:"worker_id"`
		}
		if json.Unmarshal(m.Data, &probe) != nil {
			return
		}
		ev := wireEv{at: now, attempt: probe.Attempt, seq: probe.Seq, status: probe.Status, worker: probe.Worker}
		h.mu.Lock()
		w := h.wireFor(probe.JobID)
		if probe.Type == "result" {
			w.replyTerminals = append(w.replyTerminals, ev)
		} else {
			w.tokens = append(w.tokens, ev)
		}
		h.mu.Unlock()
	}
}

// producer submits its share of the jobs and reads every caller's stream.
type producer struct {
	idx      int
	nc       *nats.Conn
	p        *bus.Client
	h        *history
	model    string
	inFlight int
	tokens   func(i int) int // max_tokens of job i
	prefix   string
	opts     bus.StreamOptions
	// span spreads the submissions evenly over this long, so the faults meet
	// jobs in every phase (queued, dispatched, streaming, recording).
	span time.Duration
}

// run submits n jobs, at most inFlight open at once, and returns when every
// caller has its terminal or ctx ends.
func (pr *producer) run(ctx context.Context, n int) {
	sem := make(chan struct{}, pr.inFlight)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		if pr.span > 0 && !pause(ctx, time.Until(start.Add(pr.span*time.Duration(i)/time.Duration(n)))) {
			break
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			wg.Wait()
			return
		}
		rec := &callerRecord{id: fmt.Sprintf("%sp%dj%04d", pr.prefix, pr.idx, i), producer: pr.idx}
		pr.h.mu.Lock()
		pr.h.callers[rec.id] = rec
		pr.h.mu.Unlock()
		seed := int64(i)
		job := &schemas.JobRequest{ID: rec.id, Model: pr.model, Prompt: fmt.Sprintf("chaos producer %d job %d", pr.idx, i),
			MaxTokens: pr.tokens(i), Sampling: schemas.Sampling{Seed: &seed}}
		st := pr.submit(ctx, rec, job)
		if st == nil {
			<-sem
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			pr.read(ctx, rec, st)
		}()
	}
	wg.Wait()
}

// submit sends the job, retrying while the bus is unreachable. A retry whose
// earlier try did land is told ErrDuplicate; the caller then watches the job.
func (pr *producer) submit(ctx context.Context, rec *callerRecord, job *schemas.JobRequest) *bus.JobStream {
	rec.submitted = time.Now()
	for {
		rec.submitTries++
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		st, _, err := bus.SubmitStream(sctx, pr.p, pr.nc, job, pr.opts)
		cancel()
		switch {
		case err == nil:
			return st
		case errors.Is(err, bus.ErrDuplicate) && rec.submitTries > 1:
			rec.watched = true
			w, werr := bus.Watch(ctx, pr.nc, pr.p.JetStream(), job.Tenant, job.ID, job.ReplyTo, pr.opts)
			if werr == nil {
				return w
			}
			err = werr
		case errors.Is(err, schemas.ErrInvalid):
			rec.submitErr = err
			return nil
		}
		rec.submitErr = err
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (pr *producer) read(ctx context.Context, rec *callerRecord, st *bus.JobStream) {
	defer st.Close()
	for {
		ev, err := st.Next(ctx)
		if errors.Is(err, bus.ErrStreamEnded) {
			return
		}
		if err != nil {
			rec.streamErr = err
			return
		}
		er := eventRec{attempt: ev.Attempt, restarted: ev.Restarted, missed: ev.Missed, terminal: ev.Terminal()}
		if ev.StartedOver {
			rec.rewinds++
		}
		if ev.Token != nil {
			// A retry's text the caller must take back (bus.Drop); the terminal's
			// Rest and Drop are left out, so the text is what the deltas built.
			kept := rec.text.String()[:rec.text.Len()-ev.Drop.Bytes]
			rec.text.Reset()
			rec.text.WriteString(kept)
			er.seq = ev.Token.Seq
			rec.text.WriteString(ev.Token.Delta)
		} else {
			er.seq = ev.Result.Seq
		}
		rec.events = append(rec.events, er)
		rec.missed += ev.Missed
		if ev.Restarted {
			rec.restarted++
		}
		if ev.Terminal() {
			rec.terminals++
			rec.result = ev.Result
			rec.recovered = ev.Recovered
			rec.finished = time.Now()
			pr.h.done.Add(1)
		}
	}
}
