package ledger_test

import (
	"errors"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/ledger"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

// The numbering, case by case: each row is a delivery of message 7 (base 0
// unless said) after the entry its earlier deliveries left.
// Mutations caught: Attempt without `e.Seq != seq` (the replay row numbers
// from a stale entry), without the High floor (the count-went-back row reuses
// attempt 3), HandBack's `- 1` dropped (the hand-back rows use an attempt).
func TestAttemptNumbering(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name            string
		e               ledger.Entry
		seq             uint64
		base, delivered int
		want            int
	}{
		{"first delivery, no entry", ledger.Entry{}, 7, 0, 1, 1},
		{"redelivery, no entry: the count", ledger.Entry{}, 7, 0, 3, 3},
		{"after a hand-back of delivery 1", ledger.HandBack(7, 0, 1, 1, 0), 7, 0, 2, 1},
		{"after three hand-backs in a row", ledger.HandBack(7, 0, 3, 1, 0), 7, 0, 4, 1},
		{"after in-process retries to attempt 3 in delivery 1", ledger.Retry(7, 0, 1, 3), 7, 0, 2, 4},
		{"retries, then a hand-back of the next delivery", ledger.HandBack(7, 0, 2, 4, 3), 7, 0, 3, 4},
		{"a replayed job's base", ledger.HandBack(7, 5, 1, 6, 0), 7, 5, 2, 6},
		{"an entry of another message (replay, resubmit)", ledger.Retry(3, 0, 1, 3), 7, 0, 1, 1},
		{"the count went back (a crashed server): the floor holds", ledger.Retry(7, 0, 2, 3), 7, 0, 1, 4},
		{"never below the base", ledger.Entry{Seq: 7, At: 1, Offset: -5}, 7, 2, 2, 3},
	} {
		if got := c.e.Attempt(c.seq, c.base, c.delivered); got != c.want {
			t.Errorf("%s: attempt %d, want %d (entry %+v)", c.name, got, c.want, c.e)
		}
	}
}

// Read finds nothing, then what Write stored; a holder of an earlier delivery
// cannot write over a later one's entry.
// Mutation caught: Write without its `cur.At > e.At` check (the stale write
// is stored and Read returns delivery 2's entry).
func TestWriteReadAndStaleHolder(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 20*time.Second)
	if e, seq, err := ledger.Read(ctx, b.JS, "t1", "j1"); err != nil || seq != 0 || e != (ledger.Entry{}) {
		t.Fatalf("empty ledger: %+v %d %v", e, seq, err)
	}
	later := ledger.Retry(9, 0, 3, 4)
	if err := ledger.Write(ctx, b.JS, "t1", "j1", ledger.HandBack(9, 0, 2, 2, 0)); err != nil {
		t.Fatal(err)
	}
	if err := ledger.Write(ctx, b.JS, "t1", "j1", later); err != nil {
		t.Fatal(err)
	}
	if err := ledger.Write(ctx, b.JS, "t1", "j1", ledger.HandBack(9, 0, 2, 2, 0)); !errors.Is(err, ledger.ErrStale) {
		t.Fatalf("a write of delivery 2 over delivery 3's entry: %v, want ErrStale", err)
	}
	e, _, err := ledger.Read(ctx, b.JS, "t1", "j1")
	if err != nil || e != later {
		t.Fatalf("read %+v %v, want %+v", e, err, later)
	}
	// Another tenant's job of the same id is another entry.
	if e, _, err := ledger.Read(ctx, b.JS, "t2", "j1"); err != nil || e != (ledger.Entry{}) {
		t.Fatalf("t2's j1: %+v %v", e, err)
	}
	// One message per job: the stream keeps the last entry only.
	if n := b.StreamMsgs(t, subjects.StreamLedger); n != 1 {
		t.Fatalf("LEDGER holds %d entries, want 1", n)
	}
	s, err := b.JS.Stream(ctx, subjects.StreamLedger)
	if err != nil {
		t.Fatal(err)
	}
	if err := ledger.Drop(ctx, s, "t1", "j1"); err != nil {
		t.Fatal(err)
	}
	if e, _, err := ledger.Read(ctx, b.JS, "t1", "j1"); err != nil || e != (ledger.Entry{}) {
		t.Fatalf("after Drop: %+v %v", e, err)
	}
}
