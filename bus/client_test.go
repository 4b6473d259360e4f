package bus

import (
	"encoding/json"
	"errors"
	"math"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go/jetstream"
)

func TestSubmitLandsInJobs(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	fixed := time.Date(2026, 5, 6, 7, 8, 9, 0, time.UTC)
	p, err := NewClient(b.nc, WithTenant("acme"), WithDefaultModel("tiny"), WithClock(func() time.Time { return fixed }))
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)

	job := &schemas.JobRequest{Prompt: "Hello", Priority: schemas.PriorityHigh}
	ack, err := p.Submit(ctx, job)
	if err != nil {
		t.Fatalf("Submit: %v", err)
	}
	if len(job.ID) != 26 || job.ID != ack.JobID {
		t.Fatalf("generated id %q (ack %q): want a 26-char ULID reported in the ack", job.ID, ack.JobID)
	}
	if ack.Subject != "mlx.jobs.acme.high."+job.ID || ack.Stream != subjects.StreamJobs || ack.Sequence != 1 {
		t.Errorf("ack = %+v", ack)
	}
	if want := "mlx.reply.acme." + job.ID; job.ReplyTo != want || ack.ReplyTo != want || p.ReplySubject(job.ID) != want {
		t.Errorf("reply_to = %q, ack %q; want %q", job.ReplyTo, ack.ReplyTo, want)
	}

	msgs := jobsInStream(t, b.js)
	if len(msgs) != 1 {
		t.Fatalf("JOBS has %d messages, want 1", len(msgs))
	}
	m := msgs[0]
	if m.Subject != subjects.Job("acme", schemas.PriorityHigh, job.ID) {
		t.Errorf("subject %q", m.Subject)
	}
	// No Nats-Msg-Id: the duplicate window is shared by every tenant, so a job
	// id there would let one tenant shadow another's submit of the same id.
	if got := m.Header.Get(jetstream.MsgIDHeader); got != "" {
		t.Errorf("Nats-Msg-Id = %q, want none", got)
	}
	got := decodeJob(t, m.Data)
	if got.Model != "tiny" || got.Tenant != "acme" || got.Prompt != "Hello" || got.CreatedAt == nil || !got.CreatedAt.Equal(fixed) {
		t.Errorf("stored job = %+v", got)
	}
	if err := schemas.Validate(schemas.Job, m.Data); err != nil {
		t.Errorf("stored job does not validate: %v", err)
	}

	// Default priority is normal; a caller-chosen reply subject under the
	// tenant's reply namespace is kept.
	j2 := newJob("caller-id-1", "x")
	j2.ReplyTo = "mlx.reply.acme.svc.caller-id-1"
	ack2, err := p.Submit(ctx, j2)
	if err != nil {
		t.Fatal(err)
	}
	if ack2.Subject != "mlx.jobs.acme.normal.caller-id-1" || j2.ReplyTo != "mlx.reply.acme.svc.caller-id-1" {
		t.Errorf("ack %+v reply_to %q", ack2, j2.ReplyTo)
	}

	// A reply subject outside the tenant's namespace, or a body naming another
	// tenant than the producer's, is refused at the edge with its path; nothing
	// is published.
	for _, tc := range []struct {
		path string
		edit func(*schemas.JobRequest)
	}{
		{"$.reply_to", func(j *schemas.JobRequest) { j.ReplyTo = "svc.replies.x" }},
		{"$.reply_to", func(j *schemas.JobRequest) { j.ReplyTo = "mlx.reply.other.x" }},
		{"$.tenant", func(j *schemas.JobRequest) { j.Tenant = "other" }},
	} {
		j := newJob("refused-"+strconv.Itoa(len(tc.path)), "x")
		tc.edit(j)
		_, err := p.Submit(ctx, j)
		var ve *schemas.ValidationError
		if !errors.As(err, &ve) || len(ve.Violations) == 0 || ve.Violations[0].Path != tc.path {
			t.Errorf("Submit with %s outside the tenant: err = %v, want a validation error at %s", tc.path, err, tc.path)
		}
	}
	if n := len(jobsInStream(t, b.js)); n != 2 {
		t.Errorf("JOBS has %d messages, want 2", n)
	}
}

func TestSubmitDuplicateID(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	p, err := NewClient(b.nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)

	if _, err := p.Submit(ctx, newJob("dup-1", "first")); err != nil {
		t.Fatal(err)
	}
	_, err = p.Submit(ctx, newJob("dup-1", "second"))
	if !errors.Is(err, ErrDuplicate) {
		t.Fatalf("resubmit: err = %v, want ErrDuplicate", err)
	}
	msgs := jobsInStream(t, b.js)
	if len(msgs) != 1 || decodeJob(t, msgs[0].Data).Prompt != "first" {
		t.Fatalf("JOBS holds %d messages; want only the first submission", len(msgs))
	}

	// A job still queued is refused by its subject, however it got there.
	if _, err := b.js.Publish(ctx, subjects.Job("", "normal", "dup-2"), []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Submit(ctx, newJob("dup-2", "again")); !errors.Is(err, ErrDuplicate) {
		t.Fatalf("resubmit of a queued job without dedup entry: err = %v, want ErrDuplicate", err)
	}

	// A job that already finished is refused for as long as RESULTS keeps it.
	if err := results.Record(ctx, b.js, newResult("done-1", 1, "w1", "hi")); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Submit(ctx, newJob("done-1", "again")); !errors.Is(err, ErrDuplicate) {
		t.Fatalf("resubmit of a finished job: err = %v, want ErrDuplicate", err)
	}
	if n := streamMsgs(t, b.js, subjects.StreamJobs); n != 2 {
		t.Fatalf("JOBS has %d messages, want 2", n)
	}
}

func TestSubmitQueueFull(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{JobsMaxMsgs: 5})
	p, err := NewClient(b.nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	want := map[string]string{}
	for i := range 5 {
		j := newJob("q-"+strconv.Itoa(i), "prompt number "+strconv.Itoa(i))
		if _, err := p.Submit(ctx, j); err != nil {
			t.Fatalf("Submit %d: %v", i, err)
		}
		want[j.ID] = j.Prompt
	}
	_, err = p.Submit(ctx, newJob("q-overflow", "one too many"))
	if !errors.Is(err, ErrQueueFull) {
		t.Fatalf("6th Submit: err = %v, want ErrQueueFull", err)
	}
	if errors.Is(err, ErrDuplicate) {
		t.Fatalf("queue full reported as duplicate: %v", err)
	}
	msgs := jobsInStream(t, b.js)
	if len(msgs) != 5 {
		t.Fatalf("JOBS has %d messages, want 5", len(msgs))
	}
	for _, m := range msgs {
		j := decodeJob(t, m.Data)
		if want[j.ID] != j.Prompt || m.Subject != subjects.Job("", "normal", j.ID) {
			t.Errorf("queued job %s (%s) prompt %q, want %q", j.ID, m.Subject, j.Prompt, want[j.ID])
		}
		delete(want, j.ID)
	}
	if len(want) != 0 {
		t.Errorf("jobs missing from JOBS: %v", want)
	}
}

func TestSubmitQueueFullByBytes(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{JobsMaxBytes: 2048})
	p, err := NewClient(b.nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	var full error
	for i := 0; i < 20 && full == nil; i++ {
		_, full = p.Submit(ctx, newJob("b-"+strconv.Itoa(i), strings.Repeat("x", 400)))
	}
	if !errors.Is(full, ErrQueueFull) {
		t.Fatalf("filling JOBS by bytes: err = %v, want ErrQueueFull", full)
	}
}

func TestSubmitTooLarge(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{JobsMaxMsgSize: 512})
	p, err := NewClient(b.nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Submit(ctxT(t), newJob("big", strings.Repeat("x", 1000))); !errors.Is(err, ErrJobTooLarge) {
		t.Fatalf("err = %v, want ErrJobTooLarge", err)
	}
}

func TestSubmitInvalidJobPublishesNothing(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	p, err := NewClient(b.nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	nan := math.NaN()
	cases := []struct {
		name string
		job  *schemas.JobRequest
		path string
	}{
		{"no model", &schemas.JobRequest{ID: "inv-1", Prompt: "x"}, "$.model"},
		{"id not a subject token", &schemas.JobRequest{ID: "a.b", Model: "tiny", Prompt: "x"}, "$.id"},
		{"unknown priority", &schemas.JobRequest{ID: "inv-3", Model: "tiny", Prompt: "x", Priority: "urgent"}, "$.priority"},
		{"max_tokens out of range", &schemas.JobRequest{ID: "inv-4", Model: "tiny", Prompt: "x", MaxTokens: -3}, "$.max_tokens"},
		{"NaN temperature", &schemas.JobRequest{ID: "inv-5", Model: "tiny", Prompt: "x", Sampling: schemas.Sampling{Temperature: &nan}}, "$.temperature"},
	}
	for _, tc := range cases {
		_, err := p.Submit(ctx, tc.job)
		var verr *schemas.ValidationError
		if !errors.As(err, &verr) || !errors.Is(err, schemas.ErrInvalid) {
			t.Errorf("%s: err = %v, want *schemas.ValidationError", tc.name, err)
			continue
		}
		if verr.Code != "invalid_request" {
			t.Errorf("%s: code %q, want invalid_request", tc.name, verr.Code)
		}
		found := false
		for _, v := range verr.Violations {
			found = found || v.Path == tc.path
		}
		if !found {
			t.Errorf("%s: violations %+v do not name %s", tc.name, verr.Violations, tc.path)
		}
	}
	if n := streamMsgs(t, b.js, subjects.StreamJobs); n != 0 {
		t.Fatalf("JOBS has %d messages after invalid submits, want 0", n)
	}
}

func TestSubmitWithoutStreamsOrConnection(t *testing.T) {
	t.Parallel()
	srv := startServerAt(t, t.TempDir(), natsserver.Options{})
	nc, _ := connectTo(t, srv)
	p, err := NewClient(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	if _, err := p.Submit(ctx, newJob("nostream", "x")); !errors.Is(err, ErrNoStream) {
		t.Fatalf("Submit before provisioning: err = %v, want ErrNoStream", err)
	}
	if _, err := p.Result(ctx, "nostream"); !errors.Is(err, ErrNoStream) {
		t.Fatalf("Result before provisioning: err = %v, want ErrNoStream", err)
	}
	nc.Close()
	if _, err := p.Submit(ctx, newJob("closed", "x")); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("Submit on a closed connection: err = %v, want ErrNotConnected", err)
	}
	if err := p.Cancel(ctx, "closed", "x"); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("Cancel on a closed connection: err = %v, want ErrNotConnected", err)
	}
}

func TestCancelLandsInCancels(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	p := b.client(t, "acme")
	ctx := ctxT(t)
	if err := p.Cancel(ctx, "job-c", "first"); err != nil {
		t.Fatalf("Cancel: %v", err)
	}
	if err := p.Cancel(ctx, "job-c", "user gave up"); err != nil {
		t.Fatalf("second Cancel: %v", err)
	}
	s, err := b.js.Stream(ctx, subjects.StreamCancels)
	if err != nil {
		t.Fatal(err)
	}
	m, err := s.GetLastMsgForSubject(ctx, subjects.Cancel("acme", "job-c"))
	if err != nil {
		t.Fatalf("cancel not in CANCELS: %v", err)
	}
	var c schemas.CancelMsg
	if err := json.Unmarshal(m.Data, &c); err != nil {
		t.Fatal(err)
	}
	if c.JobID != "job-c" || c.Reason != "user gave up" || c.Tenant != "acme" || c.RequestedAt.IsZero() {
		t.Errorf("cancel = %+v", c)
	}
	if n := streamMsgs(t, b.js, subjects.StreamCancels); n != 1 {
		t.Errorf("CANCELS has %d messages, want 1 (the latest per job)", n)
	}
	if err := p.Cancel(ctx, "a.b", "x"); !errors.Is(err, schemas.ErrInvalid) {
		t.Errorf("Cancel of an id that is no subject token: err = %v, want a validation error", err)
	}
}

func TestNewULID(t *testing.T) {
	t.Parallel()
	seen := map[string]bool{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 500 {
				id := newULID()
				mu.Lock()
				seen[id] = true
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(seen) != 2000 {
		t.Fatalf("%d distinct ids of 2000", len(seen))
	}
	for id := range seen {
		if len(id) != 26 || strings.Trim(id, crockford) != "" {
			t.Fatalf("id %q is not a ULID", id)
		}
	}
	// The first 10 characters encode the creation time in ms, so ids sort by time.
	before := time.Now().UnixMilli()
	id := newULID()
	after := time.Now().UnixMilli()
	var ms int64
	for _, c := range id[:10] {
		ms = ms<<5 | int64(strings.IndexRune(crockford, c))
	}
	if ms < before || ms > after {
		t.Errorf("id %s encodes %d ms, want within [%d, %d]", id, ms, before, after)
	}
}

// A producer reads its own tenant's records: Result under its tenant,
// TenantResult under the one named, ErrNoResult for another tenant's.
func TestClientResultIsPerTenant(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	ctx := ctxT(t)
	r := newResult("job-t", 1, "w", "for a")
	r.Tenant = "a"
	if err := results.Record(ctx, b.js, r); err != nil {
		t.Fatal(err)
	}
	pa, err := NewClient(b.nc, WithTenant("a"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := pa.Result(ctx, "job-t"); err != nil || got.Text != "for a" {
		t.Fatalf("tenant a's producer: %+v, %v", got, err)
	}
	pd, err := NewClient(b.nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pd.Result(ctx, "job-t"); !errors.Is(err, ErrNoResult) {
		t.Fatalf("the default tenant's producer sees tenant a's record: err = %v, want ErrNoResult", err)
	}
	if got, err := pd.TenantResult(ctx, "a", "job-t"); err != nil || got.Text != "for a" {
		t.Fatalf("TenantResult(a): %+v, %v", got, err)
	}
	// An id that is no subject token names no job: a wildcard answered the
	// tenant's newest record, another job's (red team round 22).
	// Mutation caught: results.Fetch without CheckJobID: job-t's record: red.
	for _, id := range []string{"*", ">", "job.t", ""} {
		var verr *schemas.ValidationError
		got, err := pa.Result(ctx, id)
		if !errors.As(err, &verr) || verr.Violations[0].Path != "$.job_id" {
			t.Errorf("Result(%q): %+v, %v; want a ValidationError at $.job_id", id, got, err)
		}
		if _, err := Watch(ctx, b.nc, b.js, "a", id, ReplySubject("a", "x"), StreamOptions{}); !errors.As(err, &verr) {
			t.Errorf("Watch(%q): %v; want a ValidationError", id, err)
		}
	}
	// Mutation caught: subscribe without the reply subject check: a watch of
	// every job's events: red.
	if _, err := Watch(ctx, b.nc, b.js, "a", "job-t", "mlx.reply.a.*", StreamOptions{}); err == nil {
		t.Error("Watch on a wildcard reply subject was opened")
	}
}

// A job whose encoding passes max payload − schemas.JobHeadroom is refused
// before it is stored: JOBS would take it, but no assignment could carry it to
// a worker (the dispatcher would fail it at intake). One just under is taken.
// Mutation caught: dropping prepare's headroom check (the big job is stored).
func TestSubmitRefusesAJobNoAssignmentCouldCarry(t *testing.T) {
	t.Parallel()
	const maxPayload = 64 << 10
	srv := startServerAt(t, t.TempDir(), natsserver.Options{MaxPayload: maxPayload})
	nc, js := connectTo(t, srv)
	ctx := ctxT(t)
	if err := jsprov.Provision(ctx, js, jsprov.Options{}); err != nil {
		t.Fatal(err)
	}
	p, err := NewClient(nc)
	if err != nil {
		t.Fatal(err)
	}
	sized := func(id string, size int) *schemas.JobRequest {
		j := newJob(id, "x")
		p.fillDefaults(j)
		base, _ := json.Marshal(j)
		j.Prompt = strings.Repeat("x", size-len(base)+1)
		return j
	}
	if _, err := p.Submit(ctx, sized("near-max", maxPayload-schemas.JobHeadroom/2)); !errors.Is(err, ErrJobTooLarge) {
		t.Fatalf("a job %d bytes under the max payload: err = %v, want ErrJobTooLarge", schemas.JobHeadroom/2, err)
	}
	if n := len(jobsInStream(t, js)); n != 0 {
		t.Fatalf("JOBS holds %d messages after the refusal", n)
	}
	if _, err := p.Submit(ctx, sized("fits", maxPayload-schemas.JobHeadroom-64)); err != nil {
		t.Fatalf("a job within the headroom: %v", err)
	}
}
