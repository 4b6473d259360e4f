package bus

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
)

// An id this process minted is not looked up in RESULTS before its publish
// (no record can exist); an id the caller chose, and a minted id submitted a
// second time, are. A tap on the RESULTS direct gets sees each lookup: the
// server routes one connection's requests in order, so a lookup made for an
// earlier submit would reach the tap before a later one's.
func TestSubmitLooksUpOnlyIDsNotMintedHere(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	tapNC, _ := connectTo(t, b.srv)
	looked := make(chan string, 16)
	if _, err := tapNC.Subscribe("$JS.API.DIRECT.GET.RESULTS.>", func(m *nats.Msg) { looked <- m.Subject }); err != nil {
		t.Fatal(err)
	}
	if err := tapNC.Flush(); err != nil {
		t.Fatal(err)
	}
	p := b.client(t, "a")
	ctx := ctxT(t)
	next := func() string {
		t.Helper()
		select {
		case s := <-looked:
			return s
		case <-time.After(10 * time.Second):
			t.Fatal("no RESULTS lookup reached the tap")
			return ""
		}
	}

	// Minted by Submit, by NewJobID (the gateway's way) and by SubmitStream.
	filled := newJob("", "filled by Submit")
	if _, err := p.Submit(ctx, filled); err != nil {
		t.Fatal(err)
	}
	ahead := newJob(NewJobID(), "minted ahead")
	if _, err := p.Submit(ctx, ahead); err != nil {
		t.Fatal(err)
	}
	s, _, err := SubmitStream(ctx, p, b.nc, newJob("", "streamed"), StreamOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	// Chosen by the caller: looked up, and the first lookup the tap sees.
	if _, err := p.Submit(ctx, newJob("chosen-1", "chosen")); err != nil {
		t.Fatal(err)
	}
	if got := next(); !strings.HasSuffix(got, ".chosen-1") {
		t.Fatalf("first RESULTS lookup was %q, want the caller-chosen id's (minted ids must not be looked up)", got)
	}
	// A minted id submitted again is looked up like any other (here it is
	// still queued, so the publish expectation refuses it).
	again := newJob(ahead.ID, "again")
	if _, err := p.Submit(ctx, again); !errors.Is(err, ErrDuplicate) {
		t.Fatalf("second submit of %s: err = %v, want ErrDuplicate", ahead.ID, err)
	}
	if got := next(); !strings.HasSuffix(got, "."+ahead.ID) {
		t.Fatalf("RESULTS lookup %q, want the resubmitted id %s", got, ahead.ID)
	}
}
