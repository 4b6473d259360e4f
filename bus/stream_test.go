package bus

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/results"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
)

func tokenLine(attempt, seq, offset int, delta string) string {
	return fmt.Sprintf(`{"type":"token","job_id":"j","attempt":%d,"seq":%d,"delta":%q,"tokens":%d,"offset":%d}`, attempt, seq, delta, seq+1, offset)
}

func TestJobStreamDropsOffsetOutOfRange(t *testing.T) {
	t.Parallel()
	s := &JobStream{jobID: "j"}
	for _, off := range []int{-1, maxOffset + 1} {
		if _, ok := s.accept([]byte(tokenLine(1, 0, off, "x"))); ok {
			t.Fatalf("offset %d accepted", off)
		}
	}
}

// A terminal event on the reply subject with no record behind it — anyone who
// may publish there (a worker credential streams tokens to every tenant's
// replies) could send one — is not the job's end: the caller gets the stored
// record, whatever the event said.
// Mutation caught: returning the event in Next without s.confirm.
func TestJobStreamHandsOverOnlyTheStoredRecord(t *testing.T) {
	t.Parallel()
	b := startBus(t, jsprov.Options{})
	p, err := NewClient(b.nc, WithTenant("acme"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	job := newJob("forged-end", "x")
	stream, ack, err := SubmitStream(ctx, p, b.nc, job, StreamOptions{QuietAfter: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	forged := newResult(ack.JobID, 1, "evil", "forged text")
	forged.Tenant = "acme"
	data, _ := json.Marshal(forged)
	if err := b.nc.Publish(ack.ReplyTo, data); err != nil {
		t.Fatal(err)
	}
	// The real end is stored a moment later (after the forged event's tries).
	real := newResult(ack.JobID, 1, "w1", "real text")
	real.Tenant = "acme"
	go func() {
		time.Sleep(400 * time.Millisecond) // fault injection: the record comes late
		_ = results.Finish(context.Background(), b.js, real, "")
	}()
	ev, err := stream.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ev.Result == nil || ev.Result.Text != "real text" || ev.Result.WorkerID != "w1" {
		t.Fatalf("caller got %+v, want the stored record", ev.Result)
	}
}
