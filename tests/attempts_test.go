package tests

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// The red-team repro through the real stack: a producer's job whose metadata
// names mlx_attempt_base 100 ends, with a valid record, on the real worker
// and runtime. Before the dispatcher clamped the base, its first attempt was
// 101: the worker dropped its own record as invalid and the dispatcher kept
// the job running for ever.
// Mutation caught: dispatcher attemptBase returning the base unclamped (no
// terminal event within the limit).
func TestAttemptBaseFromProducerStillEnds(t *testing.T) {
	s := newStack(t)
	s.startDispatcher("d1")
	s.startWorker(2)
	ctx := testenv.Context(t, 60*time.Second)

	j := tinyJob("hello", 4)
	j.Metadata = map[string]string{schemas.MetadataAttemptBase: "100"}
	o, err := s.submit(ctx, j, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := o.result
	if r.Status != schemas.StatusCompleted || r.Attempt < 1 || r.Attempt > schemas.MaxAttempt {
		t.Fatalf("result %+v", r)
	}
	stored, err := results.Fetch(ctx, s.bus.JS, r.Tenant, r.JobID)
	if err != nil {
		t.Fatal(err)
	}
	data, _ := json.Marshal(stored)
	if err := schemas.Validate(schemas.Result, data); err != nil || stored.Attempt != r.Attempt {
		t.Fatalf("stored record %s: %v", data, err)
	}
}
