package chaos

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Tenant b's client and the wire monitor the attack test judges by.

type bClient struct {
	p  *bus.Client
	nc *nats.Conn

	mu    sync.Mutex
	ids   []string
	terms map[string]*schemas.ResultMsg
	open  int
}

func newBClient(p *bus.Client, nc *nats.Conn) *bClient {
	return &bClient{p: p, nc: nc, terms: map[string]*schemas.ResultMsg{}}
}

func (bc *bClient) submit(ctx context.Context, t testing.TB, id string, maxTokens int) {
	t.Helper()
	st, _, err := bus.SubmitStream(ctx, bc.p, bc.nc, &schemas.JobRequest{ID: id, Prompt: "tenant b job " + id, MaxTokens: maxTokens}, bus.StreamOptions{})
	if err != nil {
		t.Fatalf("b submits %s: %v", id, err)
	}
	bc.mu.Lock()
	bc.ids = append(bc.ids, id)
	bc.open++
	bc.mu.Unlock()
	go func() {
		defer st.Close()
		var res *schemas.ResultMsg
		for ev, err := range st.Events(ctx) {
			if err != nil {
				break
			}
			if ev.Result != nil {
				res = ev.Result
			}
		}
		bc.mu.Lock()
		bc.terms[id] = res
		bc.open--
		bc.mu.Unlock()
	}()
}

func (bc *bClient) allDone() bool {
	bc.mu.Lock()
	defer bc.mu.Unlock()
	return bc.open == 0
}

func (bc *bClient) terminal(id string) *schemas.ResultMsg {
	bc.mu.Lock()
	defer bc.mu.Unlock()
	return bc.terms[id]
}

// attackMonitor is the admin's view of the wire: assignments offered and
// accepted (the accept is the worker's answer on the dispatcher's inbox),
// RESULTS writes, and terminal events on reply subjects.
type attackMonitor struct {
	mu        sync.Mutex
	offers    map[string]assignOffer // batch id -> offer
	running   map[string]assignOffer // job key -> the accepted assignment
	assigns   map[string][]assignOffer
	results   map[string]int      // result subject -> writes seen
	terminals map[string][]string // reply subject -> terminal texts
	tokens    map[string]int      // reply subject -> token events seen
	// accepted: batch id -> the worker that accepted it, for a reply seen
	// before its assignment. The two come through two subscriptions, each
	// with its own goroutine, and the one on mlx.> lags behind every token
	// event of every job: under load a worker's reply is often observed
	// first, and the job then never counted as running (a CI failure).
	accepted map[string]string
}

type assignOffer struct {
	worker  string
	attempt int
	jobs    []string
	resume  string // the resume text the job was offered with
	// placement is the offer's placement token (its adoption proof).
	placement string
}

func newAttackMonitor(t testing.TB, nc *nats.Conn) *attackMonitor {
	t.Helper()
	m := &attackMonitor{offers: map[string]assignOffer{}, running: map[string]assignOffer{}, assigns: map[string][]assignOffer{},
		results: map[string]int{}, terminals: map[string][]string{}, tokens: map[string]int{}, accepted: map[string]string{}}
	for _, subj := range []string{"mlx.>", "_INBOX.dispatcher.>"} {
		sub, err := nc.Subscribe(subj, m.observe)
		if err != nil {
			t.Fatal(err)
		}
		if err := sub.SetPendingLimits(-1, -1); err != nil {
			t.Fatal(err)
		}
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return m
}

func (m *attackMonitor) observe(msg *nats.Msg) {
	subj := msg.Subject
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case strings.HasPrefix(subj, "mlx.worker.") && strings.HasSuffix(subj, ".assign"):
		var a schemas.AssignmentMsg
		if json.Unmarshal(msg.Data, &a) != nil {
			return
		}
		w := subjects.WorkerOf(subj)
		for _, j := range a.Jobs {
			k := subjects.JobRef{Tenant: j.Job.Tenant, ID: j.Job.ID}.Key()
			o := assignOffer{worker: w, attempt: j.Attempt, jobs: []string{k}, placement: j.Placement}
			if j.Resume != nil {
				o.resume = j.Resume.Text
			}
			m.assigns[k] = append(m.assigns[k], o)
			prev := m.offers[a.BatchID]
			prev.worker = w
			prev.jobs = append(prev.jobs, k)
			m.offers[a.BatchID] = prev
			if m.accepted[a.BatchID] == w {
				m.running[k] = o
			}
		}
	case strings.HasPrefix(subj, "_INBOX.dispatcher."):
		var r schemas.AssignmentReplyMsg
		if json.Unmarshal(msg.Data, &r) != nil || r.BatchID == "" || r.Status != schemas.AssignAccepted {
			return
		}
		m.accepted[r.BatchID] = r.WorkerID
		for _, k := range m.offers[r.BatchID].jobs {
			for _, o := range m.assigns[k] {
				if o.worker == r.WorkerID {
					m.running[k] = o
				}
			}
		}
	case strings.HasPrefix(subj, subjects.ResultsPrefix+"."):
		m.results[subj]++
	case strings.HasPrefix(subj, subjects.ReplyPrefix+"."):
		var r struct {
			Type string `json:"type"`
			Text string `json:"text"`
		}
		if json.Unmarshal(msg.Data, &r) == nil && r.Type == "result" {
			m.terminals[subj] = append(m.terminals[subj], r.Text)
		} else if r.Type == "token" {
			m.tokens[subj]++
		}
	}
}

// runningOn is the worker that accepted the job's latest assignment, if no
// record was written since.
func (m *attackMonitor) runningOn(key string) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	tenant, id, _ := strings.Cut(key, "/")
	if m.results[subjects.Result(tenant, id)] > 0 {
		return ""
	}
	return m.running[key].worker
}

func (m *attackMonitor) attemptOf(key string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.running[key].attempt
}

func (m *attackMonitor) maxAttempt(key string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, o := range m.assigns[key] {
		n = max(n, o.attempt)
	}
	return n
}

// ranOn reports whether the job was offered to worker at that attempt.
func (m *attackMonitor) ranOn(key, worker string, attempt int) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, o := range m.assigns[key] {
		if o.worker == worker && o.attempt == attempt {
			return true
		}
	}
	return false
}

// offered is every assignment of the job seen, oldest first.
func (m *attackMonitor) offered(key string) []assignOffer {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]assignOffer(nil), m.assigns[key]...)
}

// tokensOn counts the token events seen on a reply subject.
func (m *attackMonitor) tokensOn(subj string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.tokens[subj]
}

func (m *attackMonitor) resultWritten(tenant, id string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.results[subjects.Result(tenant, id)] > 0
}

// honestTerminals counts the terminal events on a reply subject that no
// attacker wrote (the attacks mark theirs PWNED).
func (m *attackMonitor) honestTerminals(subj string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, text := range m.terminals[subj] {
		if !strings.Contains(text, "PWNED") {
			n++
		}
	}
	return n
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// hugeJSON is a JSON object of about n bytes: schema-breaking by size alone.
func hugeJSON(n int) []byte {
	return mustJSON(map[string]string{"type": "result", "job_id": "bq0", "text": strings.Repeat("P", n)})
}
