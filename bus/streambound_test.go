package bus

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A stream whose reader has stopped (a gateway handler blocked on a client
// that does not read) holds no message that is not its job's own, and at most
// DefaultPendingPayloads max payloads of its own; past that it drops, and the
// caller still gets the stored record as the job's end. Red team round 12, F1:
// a tenant had the server publish direct-get answers of its 178 KB records onto
// its own reply subjects, and each held stream queued 64 MiB of them.
// Mutations caught: push without its keep screen (the foreign flood is
// queued, 4 MB); push without its byte bound (6 MB of the own flood queued);
// withDefaults back at 64 MiB.
func TestJobStreamQueueBoundUnderFlood(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	ctx := ctxT(t)
	job := newJob("", "x")
	job.Tenant = "acme"
	s, err := OpenStream(ctx, b.nc, b.js, job, StreamOptions{QuietAfter: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	want := int(DefaultPendingPayloads * b.nc.MaxPayload())
	if s.opts.PendingBytes != want {
		t.Fatalf("pending bound %d bytes, want %d (%d max payloads)", s.opts.PendingBytes, want, DefaultPendingPayloads)
	}
	big := strings.Repeat("x", 100<<10)
	encode := func(v any) []byte {
		data, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return data
	}
	// publish hands one message to the stream and waits until its subscription
	// has taken it, so the flood never outruns the callback (the client
	// library's own pending limit would drop it first, and the queue's bound
	// would go untested).
	published := 0
	publish := func(data []byte) {
		t.Helper()
		if err := b.nc.Publish(s.replyTo, data); err != nil {
			t.Fatal(err)
		}
		published++
		for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(time.Millisecond) {
			n, _ := s.sub.Delivered()
			d, _ := s.sub.Dropped()
			if n+int64(d) >= int64(published) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d of %d messages delivered, %d dropped by the client library", n, published, d)
			}
		}
	}
	// settled: the callback has returned for every message published so far.
	// Callbacks run one at a time, so once a trailing message was taken, all
	// before it were handled.
	settled := func() {
		t.Helper()
		publish([]byte("trailer")) // not JSON: screened out, changes nothing
	}
	pending := func() (msgs, bytes int, dropped bool) {
		s.q.mu.Lock()
		defer s.q.mu.Unlock()
		return len(s.q.msgs) - s.q.head, s.q.bytes, s.q.dropped
	}

	// Foreign: another job's records, its tokens, and the job's own id in a
	// message that is no event. None may take room.
	other := newResult(NewJobID(), 1, "w", big)
	for range 60 {
		publish(encode(other))
	}
	publish([]byte(`{"type":"token","job_id":"` + other.JobID + `","attempt":1,"seq":0,"delta":"a","tokens":1}`))
	publish(encode(map[string]any{"type": "job", "job_id": s.jobID, "pad": big}))
	own := []byte(`{"type":"token","job_id":"` + s.jobID + `","attempt":1,"seq":0,"delta":"a","tokens":1}`)
	publish(own)
	settled()
	if msgs, bytes, dropped := pending(); msgs != 1 || bytes != len(own) || dropped {
		t.Fatalf("after 6 MB of foreign messages: %d messages, %d bytes pending (dropped %v), want only the job's token (%d bytes)",
			msgs, bytes, dropped, len(own))
	}

	// Its own: copies of a result of this job (what a direct get of its record
	// onto the reply subject looks like), past the bound.
	forged := newResult(s.jobID, 1, "w", big)
	forged.Tenant = "acme"
	for range 60 {
		publish(encode(forged))
	}
	settled()
	msgs, bytes, dropped := pending()
	if bytes > want || !dropped {
		t.Fatalf("after 6 MB of the job's own results: %d messages, %d bytes pending (dropped %v), want at most %d and drops",
			msgs, bytes, dropped, want)
	}

	// The caller still gets the stored record as the end.
	real := newResult(s.jobID, 1, "w1", "real text")
	real.Tenant = "acme"
	if err := results.Finish(ctx, b.js, real, ""); err != nil {
		t.Fatal(err)
	}
	var end *schemas.ResultMsg
	for end == nil {
		ev, err := s.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		end = ev.Result
	}
	if end.Text != "real text" || end.WorkerID != "w1" {
		t.Fatalf("the stream ended with %q from %q, want the stored record", end.Text, end.WorkerID)
	}
}

// The screen keeps exactly the job's own token and result events.
func TestOwnEventScreen(t *testing.T) {
	t.Parallel()
	keep := ownEvent("J1", "r.J1")
	for _, c := range []struct {
		subject, data string
		want          bool
	}{
		{"r.J1", `{"type":"token","job_id":"J1"}`, true},
		{"r.J1", `{"type":"result","job_id":"J1"}`, true},
		{"other", `{"type":"token","job_id":"J1"}`, false},
		{"r.J1", `{"type":"token","job_id":"J2"}`, false},
		{"r.J1", `{"type":"job","job_id":"J1"}`, false},
		{"r.J1", `not json`, false},
	} {
		if got := keep(&nats.Msg{Subject: c.subject, Data: []byte(c.data)}); got != c.want {
			t.Errorf("%s %s: keep %v, want %v", c.subject, c.data, got, c.want)
		}
	}
}
