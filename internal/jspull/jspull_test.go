package jspull_test

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jspull"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

// A pull hands over every message the server delivered for it, however long
// the handler takes: with one timer for the whole pull, a slow handler (or a
// paused process) let the timer fire while messages waited, and the pull
// returned without them — delivered, for the server, and never seen (this
// session's review: 1 to 3 of 10). A stored message that looks like a status
// message (no body, a Status header) is handed over like any other.
// Mutations caught: the timer not restarted per message (messages lost);
// no drain on the timer.
func TestPullHandsOverEveryDeliveredMessage(t *testing.T) {
	t.Parallel()
	js := testenv.StartJetStream(t)
	ctx := testenv.Context(t, 30*time.Second)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "S", Subjects: []string{"s.>"}}); err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		m := nats.NewMsg("s.x")
		if i == 3 {
			m.Header.Set("Status", "404")
			m.Header.Set("Description", "No Messages")
		} else {
			m.Data = []byte{byte('a' + i)}
		}
		if _, err := js.PublishMsg(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	c, err := js.CreateConsumer(ctx, "S", jetstream.ConsumerConfig{AckPolicy: jetstream.AckNonePolicy})
	if err != nil {
		t.Fatal(err)
	}
	var got []uint64
	n, err := jspull.Pull(ctx, js.Conn(), "$JS.API.", "S", c.CachedInfo().Name,
		jspull.Request{Batch: 10, Expires: 200 * time.Millisecond}, func(m jetstream.Msg) {
			md, err := m.Metadata()
			if err != nil {
				t.Error(err)
				return
			}
			got = append(got, md.Sequence.Stream)
			if len(got) == 1 {
				time.Sleep(1500 * time.Millisecond) // a slow handler, past the pull's expiry
			}
		})
	if err != nil || n != 10 || len(got) != 10 {
		t.Fatalf("handed over %d (%v), err %v; want all 10 delivered messages", n, got, err)
	}
	for i, seq := range got {
		if seq != uint64(i+1) {
			t.Fatalf("sequences %v, want 1..10 in order", got)
		}
	}
}
