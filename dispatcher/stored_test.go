package dispatcher

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// The red team's L-1: JOBS' headers-only re-publish (the wake-up) carries
// the job's own headers before the ones the server appends, so a producer's
// "Nats-Sequence: <max>" on its own job came first, and a relayed direct get
// of a value carrying one reached the wake-up subject too. onStored must take
// the server's (last) values, and only from JOBS. Checked on a real
// re-publish. Mutation caught: Header.Get (the first value) for the sequence.
func TestWakeUpSequenceIsTheServers(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	d, err := New(testConfig("d1", e.connect("d1")))
	if err != nil {
		t.Fatal(err)
	}
	wake, err := e.nc.SubscribeSync(subjects.JobsStored)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	j := newJob("forged-seq", "m", schemas.PriorityNormal)
	data, _ := json.Marshal(j)
	msg := nats.NewMsg(subjects.Job("", schemas.PriorityNormal, j.ID))
	msg.Data = data
	msg.Header.Set("Nats-Sequence", "18446744073709551615")
	ack, err := e.js.PublishMsg(context.Background(), msg)
	if err != nil {
		t.Fatal(err)
	}
	m, err := wake.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got := m.Header.Values("Nats-Sequence"); len(got) != 2 {
		t.Fatalf("re-publish headers %v: the job's own header is no longer kept, rewrite this test", m.Header)
	}
	p := priorityIndex(schemas.PriorityNormal)
	d.onStored(m)
	if got := d.storedSeq[p].Load(); got != ack.Sequence {
		t.Fatalf("announced sequence %d, want the stored job's %d", got, ack.Sequence)
	}
	// A wake-up whose last Nats-Stream is another stream (a relayed direct
	// get of a bucket value) is no announcement.
	relayed := nats.NewMsg(subjects.JobStored(schemas.PriorityNormal))
	relayed.Header["Nats-Sequence"] = []string{"18446744073709551615", "18446744073709551614"}
	relayed.Header["Nats-Stream"] = []string{subjects.StreamJobs, subjects.ModelsStream}
	d.onStored(relayed)
	if got := d.storedSeq[p].Load(); got != ack.Sequence {
		t.Fatalf("after a relayed wake-up: announced %d, want %d", got, ack.Sequence)
	}
}
