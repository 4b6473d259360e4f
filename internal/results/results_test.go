package results

import (
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go/jetstream"
)

// Mutation caught: removing both guards of RESULTS, Record's
// WithExpectLastSequencePerSubject(0) and the stream's DiscardNewPerSubject
// (bus/provision.go): the second record is stored. Either guard alone holds.
func TestRecordResultFirstWriterWins(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	ctx := ctxT(t)

	first := newResult("job-r", 1, "worker-a", "first text")
	if err := Record(ctx, b.js, first); err != nil {
		t.Fatalf("first Record: %v", err)
	}
	// Another attempt's record: refused by the server (wrong last subject sequence).
	if err := Record(ctx, b.js, newResult("job-r", 2, "worker-b", "second text")); !errors.Is(err, ErrResultExists) {
		t.Fatalf("second Record: err = %v, want ErrResultExists", err)
	}
	// Same attempt, different record: the msg id is a duplicate, still a loss.
	if err := Record(ctx, b.js, newResult("job-r", 1, "worker-c", "third text")); !errors.Is(err, ErrResultExists) {
		t.Fatalf("same-attempt Record: err = %v, want ErrResultExists", err)
	}
	// The first writer retrying its own record (lost ack) is told it won.
	if err := Record(ctx, b.js, newResult("job-r", 1, "worker-a", "first text")); err != nil {
		t.Fatalf("retry of the stored record: %v", err)
	}
	got, err := Fetch(ctx, b.js, "", "job-r")
	if err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	if got.WorkerID != "worker-a" || got.Text != "first text" || got.Attempt != 1 || !got.FinishedAt.Equal(first.FinishedAt) {
		t.Errorf("stored record = %+v, want the first", got)
	}
	if n := streamMsgs(t, b.js, subjects.StreamResults); n != 1 {
		t.Errorf("RESULTS has %d messages, want 1", n)
	}
}

// Even without the expected-sequence header, the stream refuses a second record.
// Mutation caught: DiscardNewPerSubject false for RESULTS in bus/provision.go.
func TestResultsStreamRefusesSecondRecordByItself(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	ctx := ctxT(t)
	if err := Record(ctx, b.js, newResult("job-s", 1, "a", "x")); err != nil {
		t.Fatal(err)
	}
	_, err := b.js.Publish(ctx, subjects.Result("", "job-s"), []byte(`{"rogue":true}`))
	if err == nil {
		t.Fatal("plain publish of a second record was accepted")
	}
	if !resultRefused(err) {
		t.Errorf("refusal %v not recognised as an existing result", err)
	}
}

// Mutation caught: both RESULTS guards removed (see TestRecordResultFirstWriterWins):
// all 8 writers win.
func TestRecordResultRaceHasOneWinner(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	ctx := ctxT(t)
	const writers = 8
	errs := make([]error, writers)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			errs[i] = Record(ctx, b.js, newResult("job-race", i+1, "w", "text"))
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
		case !errors.Is(err, ErrResultExists):
			t.Errorf("writer %d: unexpected error %v", i, err)
		}
	}
	if winners != 1 {
		t.Fatalf("%d writers won, want exactly 1 (%v)", winners, errs)
	}
	got, err := Fetch(ctx, b.js, "", "job-race")
	if err != nil || got.Attempt != winner {
		t.Fatalf("stored record attempt %v (%v), want the winner's %d", got, err, winner)
	}
}

func TestFetchAndPurgeResult(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	ctx := ctxT(t)
	if _, err := Fetch(ctx, b.js, "", "nothing-here"); !errors.Is(err, ErrNoResult) {
		t.Fatalf("Fetch of an unknown job: err = %v, want ErrNoResult", err)
	}
	r := newResult("job-p", 1, "a", "old")
	r.Status, r.FinishReason, r.Error = schemas.StatusFailed, "", &schemas.ErrorInfo{Code: "runtime_crashed", Message: "boom"}
	if err := Record(ctx, b.js, r); err != nil {
		t.Fatal(err)
	}
	got, err := Fetch(ctx, b.js, "", "job-p")
	if err != nil || got.Status != schemas.StatusFailed || got.Error == nil || got.Error.Code != "runtime_crashed" {
		t.Fatalf("Result = %+v, %v", got, err)
	}
	if err := Purge(ctx, b.js, "", "job-p"); err != nil {
		t.Fatalf("Purge: %v", err)
	}
	if _, err := Fetch(ctx, b.js, "", "job-p"); !errors.Is(err, ErrNoResult) {
		t.Fatalf("after purge: err = %v, want ErrNoResult", err)
	}
	// A replay records a new outcome under a later attempt number.
	if err := Record(ctx, b.js, newResult("job-p", 2, "b", "new")); err != nil {
		t.Fatalf("Record after purge: %v", err)
	}
	if got, err := Fetch(ctx, b.js, "", "job-p"); err != nil || got.Text != "new" {
		t.Fatalf("after replay: %+v, %v", got, err)
	}
}

func TestRecordResultRejectsInvalidRecord(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	ctx := ctxT(t)
	r := newResult("job-i", 1, "a", "x")
	r.Status = "exploded"
	if err := Record(ctx, b.js, r); !errors.Is(err, schemas.ErrInvalid) {
		t.Fatalf("err = %v, want a validation error", err)
	}
	s, err := b.js.Stream(ctx, subjects.StreamResults)
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
	b := startBus(t, jsprov.Options{})
	ctx := ctxT(t)
	a := newResult("job-t", 1, "w", "for a")
	a.Tenant = "a"
	if err := Record(ctx, b.js, a); err != nil {
		t.Fatal(err)
	}
	if _, err := Fetch(ctx, b.js, "b", "job-t"); !errors.Is(err, ErrNoResult) {
		t.Fatalf("tenant b sees tenant a's record: err = %v, want ErrNoResult", err)
	}
	if _, err := Fetch(ctx, b.js, "", "job-t"); !errors.Is(err, ErrNoResult) {
		t.Fatalf("the default tenant sees tenant a's record: err = %v, want ErrNoResult", err)
	}
	if got, err := Fetch(ctx, b.js, "a", "job-t"); err != nil || got.Text != "for a" {
		t.Fatalf("tenant a's record: %+v, %v", got, err)
	}
	d := newResult("job-t", 1, "w", "for default")
	if err := Record(ctx, b.js, d); err != nil {
		t.Fatalf("default tenant's record of the same id: %v", err)
	}
	if got, err := Fetch(ctx, b.js, subjects.DefaultTenant, "job-t"); err != nil || got.Text != "for default" {
		t.Fatalf("default tenant by name: %+v, %v", got, err)
	}
	if raw, err := Stored(ctx, b.js, "a", "job-t"); err != nil || !strings.Contains(string(raw), "for a") {
		t.Fatalf("Stored of tenant a's record: %s, %v", raw, err)
	}
	if _, err := Stored(ctx, b.js, "b", "job-t"); !errors.Is(err, ErrNoResult) {
		t.Fatalf("Stored under tenant b: err = %v, want ErrNoResult", err)
	}
	if err := Purge(ctx, b.js, "a", "job-t"); err != nil {
		t.Fatal(err)
	}
	if _, err := Fetch(ctx, b.js, "", "job-t"); err != nil {
		t.Fatalf("purging tenant a's record removed the default tenant's: %v", err)
	}
}
