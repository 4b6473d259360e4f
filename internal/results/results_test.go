package results_test

import (
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jserr"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Mutation caught: removing both guards of RESULTS, Record's
// WithExpectLastSequencePerSubject(0) and the stream's DiscardNewPerSubject
// (bus/provision.go): the second record is stored. Either guard alone holds.
func TestRecordResultFirstWriterWins(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 20*time.Second)

	first := newResult("job-r", 1, "worker-a", "first text")
	if err := results.Record(ctx, b.JS, first); err != nil {
		t.Fatalf("first Record: %v", err)
	}
	// Another attempt's record: refused by the server (wrong last subject sequence).
	if err := results.Record(ctx, b.JS, newResult("job-r", 2, "worker-b", "second text")); !errors.Is(err, results.ErrResultExists) {
		t.Fatalf("second Record: err = %v, want ErrResultExists", err)
	}
	// Same attempt, different record: the msg id is a duplicate, still a loss.
	if err := results.Record(ctx, b.JS, newResult("job-r", 1, "worker-c", "third text")); !errors.Is(err, results.ErrResultExists) {
		t.Fatalf("same-attempt Record: err = %v, want ErrResultExists", err)
	}
	// The first writer retrying its own record (lost ack) is told it won.
	if err := results.Record(ctx, b.JS, newResult("job-r", 1, "worker-a", "first text")); err != nil {
		t.Fatalf("retry of the stored record: %v", err)
	}
	got, err := results.Fetch(ctx, b.JS, "", "job-r")
	if err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	if got.WorkerID != "worker-a" || got.Text != "first text" || got.Attempt != 1 || !got.FinishedAt.Equal(first.FinishedAt) {
		t.Errorf("stored record = %+v, want the first", got)
	}
	if n := b.StreamMsgs(t, subjects.StreamResults); n != 1 {
		t.Errorf("RESULTS has %d messages, want 1", n)
	}
}

// Even without the expected-sequence header, the stream refuses a second record.
// Mutation caught: DiscardNewPerSubject false for RESULTS in bus/provision.go.
func TestResultsStreamRefusesSecondRecordByItself(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 20*time.Second)
	if err := results.Record(ctx, b.JS, newResult("job-s", 1, "a", "x")); err != nil {
		t.Fatal(err)
	}
	_, err := b.JS.Publish(ctx, subjects.Result("", "job-s"), []byte(`{"rogue":true}`))
	if err == nil {
		t.Fatal("plain publish of a second record was accepted")
	}
	if !jserr.IsAlreadyStored(err) {
		t.Errorf("refusal %v not recognised as an existing result", err)
	}
}

// Mutation caught: both RESULTS guards removed (see TestRecordResultFirstWriterWins):
// all 8 writers win.
func TestRecordResultRaceHasOneWinner(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 20*time.Second)
	const writers = 8
	errs := make([]error, writers)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			errs[i] = results.Record(ctx, b.JS, newResult("job-race", i+1, "w", "text"))
		}()
	}
	close(start)
	wg.Wait()
	winners := 0
	winner := 0
	for i, err := range errs {
		switch {
		case err == nil:
			winners++
			winner = i + 1
		case !errors.Is(err, results.ErrResultExists):
			t.Errorf("writer %d: unexpected error %v", i, err)
		}
	}
	if winners != 1 {
		t.Fatalf("%d writers won, want exactly 1 (%v)", winners, errs)
	}
	got, err := results.Fetch(ctx, b.JS, "", "job-race")
	if err != nil || got.Attempt != winner {
		t.Fatalf("stored record attempt %v (%v), want the winner's %d", got, err, winner)
	}
}

func TestFetchAndPurgeResult(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 20*time.Second)
	if _, err := results.Fetch(ctx, b.JS, "", "nothing-here"); !errors.Is(err, results.ErrNoResult) {
		t.Fatalf("Fetch of an unknown job: err = %v, want ErrNoResult", err)
	}
	r := newResult("job-p", 1, "a", "old")
	r.Status, r.FinishReason, r.Error = schemas.StatusFailed, "", &schemas.ErrorInfo{Code: "runtime_crashed", Message: "boom"}
	if err := results.Record(ctx, b.JS, r); err != nil {
		t.Fatal(err)
	}
	got, err := results.Fetch(ctx, b.JS, "", "job-p")
	if err != nil || got.Status != schemas.StatusFailed || got.Error == nil || got.Error.Code != "runtime_crashed" {
		t.Fatalf("Result = %+v, %v", got, err)
	}
	if err := results.Purge(ctx, b.JS, "", "job-p"); err != nil {
		t.Fatalf("Purge: %v", err)
	}
	if _, err := results.Fetch(ctx, b.JS, "", "job-p"); !errors.Is(err, results.ErrNoResult) {
		t.Fatalf("after purge: err = %v, want ErrNoResult", err)
	}
	// A replay records a new outcome under a later attempt number.
	if err := results.Record(ctx, b.JS, newResult("job-p", 2, "b", "new")); err != nil {
		t.Fatalf("Record after purge: %v", err)
	}
	if got, err := results.Fetch(ctx, b.JS, "", "job-p"); err != nil || got.Text != "new" {
		t.Fatalf("after replay: %+v, %v", got, err)
	}
}

func TestRecordResultRejectsInvalidRecord(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 20*time.Second)
	r := newResult("job-i", 1, "a", "x")
	r.Status = "exploded"
	if err := results.Record(ctx, b.JS, r); !errors.Is(err, schemas.ErrInvalid) {
		t.Fatalf("err = %v, want a validation error", err)
	}
	s, err := b.JS.Stream(ctx, subjects.StreamResults)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetLastMsgForSubject(ctx, subjects.Result("", "job-i")); !errors.Is(err, jetstream.ErrMsgNotFound) {
		t.Fatalf("invalid record was stored: %v", err)
	}
}

func TestRecordTenantKeepsOnlyTenantNames(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{"a": "a", "acme-1_x": "acme-1_x", "": "", "A": "", "a.b": "", "*": "", ">": "", "-a": ""} {
		if got := subjects.RecordTenant(in); got != want {
			t.Errorf("subjects.RecordTenant(%q) = %q, want %q", in, got, want)
		}
	}
}

// Records live under their job's tenant: the same id in two tenants is two jobs,
// and a job without a tenant is the default tenant's.
func TestResultsAreKeptPerTenant(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 20*time.Second)
	a := newResult("job-t", 1, "w", "for a")
	a.Tenant = "a"
	if err := results.Record(ctx, b.JS, a); err != nil {
		t.Fatal(err)
	}
	if _, err := results.Fetch(ctx, b.JS, "b", "job-t"); !errors.Is(err, results.ErrNoResult) {
		t.Fatalf("tenant b sees tenant a's record: err = %v, want ErrNoResult", err)
	}
	if _, err := results.Fetch(ctx, b.JS, "", "job-t"); !errors.Is(err, results.ErrNoResult) {
		t.Fatalf("the default tenant sees tenant a's record: err = %v, want ErrNoResult", err)
	}
	if got, err := results.Fetch(ctx, b.JS, "a", "job-t"); err != nil || got.Text != "for a" {
		t.Fatalf("tenant a's record: %+v, %v", got, err)
	}
	d := newResult("job-t", 1, "w", "for default")
	if err := results.Record(ctx, b.JS, d); err != nil {
		t.Fatalf("default tenant's record of the same id: %v", err)
	}
	if got, err := results.Fetch(ctx, b.JS, subjects.DefaultTenant, "job-t"); err != nil || got.Text != "for default" {
		t.Fatalf("default tenant by name: %+v, %v", got, err)
	}
	if raw, err := results.Stored(ctx, b.JS, "a", "job-t"); err != nil || !strings.Contains(string(raw), "for a") {
		t.Fatalf("Stored of tenant a's record: %s, %v", raw, err)
	}
	if _, err := results.Stored(ctx, b.JS, "b", "job-t"); !errors.Is(err, results.ErrNoResult) {
		t.Fatalf("Stored under tenant b: err = %v, want ErrNoResult", err)
	}
	if err := results.Purge(ctx, b.JS, "a", "job-t"); err != nil {
		t.Fatal(err)
	}
	if _, err := results.Fetch(ctx, b.JS, "", "job-t"); err != nil {
		t.Fatalf("purging tenant a's record removed the default tenant's: %v", err)
	}
}

func newResult(jobID string, attempt int, worker, text string) *schemas.ResultMsg {
	return &schemas.ResultMsg{
		Type: "result", JobID: jobID, Attempt: attempt, Seq: 3, Status: schemas.StatusCompleted,
		FinishReason: "stop", Text: text, Usage: schemas.Usage{PromptTokens: 2, CompletionTokens: 3, TotalTokens: 5},
		WorkerID: worker, FinishedAt: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
	}
}

// A purge bound to the old record's sequence that lands after the replayed
// job wrote its new record (an answer lost in a leader change, the purge
// applied late) leaves the new record; only the old one goes.
// Mutation caught: PurgeUpTo without WithPurgeSequence (the new record is
// purged too: the job ends with no record, its letter already dropped): red.
func TestLatePurgeLeavesTheNewRecord(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 20*time.Second)
	if err := results.Record(ctx, b.JS, newResult("job-late", 1, "a", "old")); err != nil {
		t.Fatal(err)
	}
	_, oldSeq, err := results.StoredSeq(ctx, b.JS, "", "job-late")
	if err != nil {
		t.Fatal(err)
	}
	if err := results.PurgeUpTo(ctx, b.JS, "", "job-late", oldSeq); err != nil {
		t.Fatal(err)
	}
	if err := results.Record(ctx, b.JS, newResult("job-late", 2, "b", "new")); err != nil {
		t.Fatal(err)
	}
	if err := results.PurgeUpTo(ctx, b.JS, "", "job-late", oldSeq); err != nil { // the late one
		t.Fatal(err)
	}
	if got, err := results.Fetch(ctx, b.JS, "", "job-late"); err != nil || got.Text != "new" {
		t.Fatalf("after the late purge: %+v, %v; want the new record", got, err)
	}
}
