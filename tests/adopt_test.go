package tests

import (
	"context"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// The dispatcher that placed a running job crashes (its connection closed: no
// nak, no answer) and another takes over. The real worker finishes the job,
// finds no responder for its record, and offers it for adoption; the
// surviving dispatcher stores it, and the JOBS redelivery after the ack wait
// is acked without running. With max_attempts 1 the job ends completed at
// attempt 1, its caller's stream gets that record, and the job ran once.
// Before adoption the record was dropped and the job ended attempts_exhausted.
// Mutation caught: worker.finish without the adopt call (attempts_exhausted).
func TestCrashedDispatchersRecordIsAdopted(t *testing.T) {
	t.Parallel()
	s := newStack(t)
	nc1 := testenv.Connect(t, s.bus.Server.ClientURL())
	s.startDispatcherOn("d1", nc1, 1)
	s.startWorker(1)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	var crash sync.Once
	crashed := make(chan struct{})
	job := tinyJob("Tell me a long story about the sea", 200)
	job.ID = "adopt-" + time.Now().UTC().Format("150405000000")
	o, err := s.submit(ctx, job, func(bus.Event) {
		crash.Do(func() {
			nc1.Close()
			close(crashed)
			go s.startDispatcherOn("d2", testenv.Connect(t, s.bus.Server.ClientURL()), 1)
		})
	})
	if err != nil {
		t.Fatalf("stream: %v", err)
	}
	select {
	case <-crashed:
	default:
		t.Fatal("the job streamed no token before it ended: the crash came too late")
	}
	r := o.result
	if r.Status != schemas.StatusCompleted || r.Attempt != 1 {
		t.Fatalf("record %s at attempt %d (%+v); want completed at attempt 1", r.Status, r.Attempt, r.Error)
	}
	if got := slices.Sorted(maps.Keys(o.attempts)); !slices.Equal(got, []int{1}) {
		t.Errorf("the caller saw attempts %v, want only 1", got)
	}
	if r.Usage.CompletionTokens == 0 || r.Text == "" {
		t.Errorf("adopted record without its generation: %+v", r)
	}
	// The redelivery (ack wait 6 s) is acked without running.
	waitFor(t, 30*time.Second, func() bool { return s.bus.StreamMsgs(t, subjects.StreamJobs) == 0 })
	stored, err := s.prod.Result(ctx, job.ID)
	if err != nil || stored.Attempt != 1 || stored.Status != schemas.StatusCompleted {
		t.Fatalf("stored record %+v (%v), want completed at attempt 1", stored, err)
	}
}
