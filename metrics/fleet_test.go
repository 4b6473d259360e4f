package metrics_test

import (
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/metrics"
	"github.com/mlx-serving/mlx-serving/schemas"
)

func startFleet(t *testing.T, b *testenv.Bus) *scraper {
	t.Helper()
	f, err := metrics.NewFleet(metrics.FleetOptions{Conn: b.Conn, MinInterval: time.Nanosecond, Logger: testenv.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Start(testenv.Context(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Stop)
	reg := prometheus.NewRegistry()
	reg.MustRegister(f)
	return serve(t, reg)
}

// TestFleetGauges: queue depth per priority, DLQ and the workers (their prompt
// cache stats included) come from the bus as it is when scraped, and follow it
// when it changes. Mutation caught: the prompt_cache series left out of Collect.
func TestFleetGauges(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 30*time.Second)
	s := startFleet(t, b)

	s.waitFor(ctx,
		expectation{"mlx_fleet_queue_depth", L("priority", "high"), 0},
		expectation{"mlx_fleet_dlq_messages", nil, 0},
		expectation{"mlx_fleet_workers", L("state", "ready"), 0},
	)

	publishJob := func(priority, id string) uint64 {
		job := schemas.JobRequest{ID: id, Model: "m", Prompt: "p", ReplyTo: "r." + id, Priority: priority}
		data, _ := json.Marshal(job)
		ack, err := b.JS.Publish(ctx, subjects.Job("", priority, id), data)
		if err != nil {
			t.Fatal(err)
		}
		return ack.Sequence
	}
	publishJob("high", "h1")
	publishJob("low", "l1")
	lowSeq := publishJob("low", "l2")
	if _, err := b.JS.Publish(ctx, subjects.DLQ("", "d1"), []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	kv, err := b.JS.KeyValue(ctx, subjects.BucketWorkers)
	if err != nil {
		t.Fatal(err)
	}
	putHB := func(hb schemas.HeartbeatMsg) {
		data, _ := json.Marshal(hb)
		if _, err := kv.Put(ctx, hb.WorkerID, data); err != nil {
			t.Fatal(err)
		}
	}
	putHB(schemas.HeartbeatMsg{WorkerID: "mac-1", State: schemas.WorkerReady, Slots: 8, InFlight: 3, Models: []string{"m"},
		PromptCache: &schemas.PromptCacheStats{Entries: 2, Bytes: 4096, MaxBytes: 1 << 20, Lookups: 4, Hits: 1, HitTokens: 30, PromptTokens: 120}})
	putHB(schemas.HeartbeatMsg{WorkerID: "mac-2", State: schemas.WorkerDraining, Slots: 4, InFlight: 1, Models: []string{"m"}})

	s.waitFor(ctx,
		expectation{"mlx_fleet_queue_depth", L("priority", "high"), 1},
		expectation{"mlx_fleet_queue_depth", L("priority", "normal"), 0},
		expectation{"mlx_fleet_queue_depth", L("priority", "low"), 2},
		expectation{"mlx_fleet_dlq_messages", nil, 1},
		expectation{"mlx_fleet_workers", L("state", "ready"), 1},
		expectation{"mlx_fleet_workers", L("state", "draining"), 1},
		expectation{"mlx_fleet_worker_slots", L("worker_id", "mac-1"), 8},
		expectation{"mlx_fleet_worker_in_flight", L("worker_id", "mac-1"), 3},
		expectation{"mlx_fleet_worker_in_flight", L("worker_id", "mac-2"), 1},
		expectation{"mlx_fleet_worker_prompt_cache_bytes", L("worker_id", "mac-1"), 4096},
		expectation{"mlx_fleet_worker_prompt_cache_hit_tokens_total", L("worker_id", "mac-1"), 30},
		expectation{"mlx_fleet_worker_prompt_cache_prompt_tokens_total", L("worker_id", "mac-1"), 120},
		expectation{"mlx_fleet_worker_prompt_cache_hit_rate", L("worker_id", "mac-1"), 0.25},
	)

	// A job leaves the queue and a worker leaves the registry.
	jobs, err := b.JS.Stream(ctx, subjects.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	if err := jobs.DeleteMsg(ctx, lowSeq); err != nil {
		t.Fatal(err)
	}
	if err := kv.Delete(ctx, "mac-2"); err != nil {
		t.Fatal(err)
	}
	mfs := s.waitFor(ctx,
		expectation{"mlx_fleet_queue_depth", L("priority", "low"), 1},
		expectation{"mlx_fleet_workers", L("state", "draining"), 0},
	)
	if _, ok := value(mfs, "mlx_fleet_worker_slots", L("worker_id", "mac-2")); ok {
		t.Fatal("a worker gone from the registry still has a slots series")
	}
}

// TestFleetResults: terminal records are counted once each, as RESULTS stores
// them — a second record the server refuses is not — with TTFT and tokens/s per
// model, invalid_request by source, and attempt reports by code.
func TestFleetResults(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 30*time.Second)
	s := startFleet(t, b)

	// Models are labels only once a worker announced them.
	kv, err := b.JS.KeyValue(ctx, subjects.BucketWorkers)
	if err != nil {
		t.Fatal(err)
	}
	hb, _ := json.Marshal(schemas.HeartbeatMsg{WorkerID: "mac-1", State: schemas.WorkerReady, Slots: 8, Models: []string{"tiny", "big"}})
	if _, err := kv.Put(ctx, "mac-1", hb); err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	record := func(r schemas.ResultMsg) error {
		r.Type, r.FinishedAt = "result", now
		return results.Record(ctx, b.JS, &r)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(record(schemas.ResultMsg{JobID: "j1", Attempt: 1, Status: schemas.StatusCompleted, FinishReason: schemas.FinishStop, Model: "tiny", WorkerID: "mac-1",
		Usage:   schemas.Usage{PromptTokens: 3, CompletionTokens: 10, TotalTokens: 13},
		Timings: &schemas.Timings{TTFTMs: 40, TokensPerSec: 55, TotalMs: 200, QueuedMs: 5}}))
	must(record(schemas.ResultMsg{JobID: "j2", Attempt: 3, Status: schemas.StatusCompleted, FinishReason: schemas.FinishLength, Model: "big", WorkerID: "mac-2",
		Usage:   schemas.Usage{CompletionTokens: 7, TotalTokens: 7},
		Timings: &schemas.Timings{TTFTMs: 900, TokensPerSec: 12}}))
	// The dispatcher's terminal for j1 comes second: RESULTS refuses it.
	err = record(schemas.ResultMsg{JobID: "j1", Attempt: 1, Status: schemas.StatusFailed, Model: "tiny",
		Error: &schemas.ErrorInfo{Code: "attempts_exhausted", Message: "late"}})
	if !errors.Is(err, results.ErrResultExists) {
		t.Fatalf("second record: %v, want ErrResultExists", err)
	}
	must(record(schemas.ResultMsg{JobID: "j3", Attempt: 1, Status: schemas.StatusFailed, WorkerID: "mac-1",
		Error: &schemas.ErrorInfo{Code: "invalid_request", Message: "bad"}}))
	must(record(schemas.ResultMsg{JobID: "j4", Attempt: 1, Status: schemas.StatusFailed, Model: "tiny",
		Error: &schemas.ErrorInfo{Code: "invalid_request", Message: "bad"}}))
	// A model nobody announced (any producer may name one) is "unknown": no
	// series per made-up name. Mutation caught: labelling r.Model unmapped.
	must(record(schemas.ResultMsg{JobID: "j6", Attempt: 1, Status: schemas.StatusFailed, Model: "made-up-model",
		Error: &schemas.ErrorInfo{Code: "model_not_found", Message: "x"}, FinishedAt: now}))
	must(record(schemas.ResultMsg{JobID: "j5", Attempt: 0, Status: schemas.StatusCancelled, FinishReason: schemas.FinishCancelled, Model: "tiny",
		Error: &schemas.ErrorInfo{Code: "cancelled", Message: "by request"}}))
	report, _ := json.Marshal(schemas.AttemptReportMsg{JobID: "j2", Attempt: 1, WorkerID: "mac-3",
		Error: schemas.ErrorInfo{Code: "runtime_crashed", Message: "x", Retryable: true}, ReportedAt: now})
	must(b.Conn.PublishRequest(subjects.Attempt("j2"), b.Conn.NewInbox(), report)) // as a worker sends it (subjects.Sent)

	s.waitFor(ctx,
		expectation{"mlx_fleet_jobs_finished_total", L("status", "completed", "model", "tiny"), 1},
		expectation{"mlx_fleet_jobs_finished_total", L("status", "failed", "model", "unknown"), 1},
		expectation{"mlx_fleet_jobs_finished_total", L("status", "completed", "model", "big"), 1},
		expectation{"mlx_fleet_jobs_finished_total", L("status", "failed", "model", "tiny"), 1},
		expectation{"mlx_fleet_jobs_finished_total", L("status", "failed", "model", ""), 1},
		expectation{"mlx_fleet_jobs_finished_total", L("status", "cancelled", "model", "tiny"), 1},
		expectation{"mlx_fleet_job_errors_total", L("code", "invalid_request"), 2},
		expectation{"mlx_fleet_job_errors_total", L("code", "cancelled"), 1},
		expectation{"mlx_fleet_schema_rejections_total", L("source", "worker"), 1},
		expectation{"mlx_fleet_schema_rejections_total", L("source", "dispatcher"), 1},
		expectation{"mlx_fleet_attempt_failures_total", L("code", "runtime_crashed"), 1},
		expectation{"mlx_fleet_job_ttft_seconds", L("model", "tiny"), 1},
		expectation{"mlx_fleet_job_ttft_seconds", L("model", "big"), 1},
		expectation{"mlx_fleet_job_tokens_per_second", L("model", "tiny"), 1},
		expectation{"mlx_fleet_completion_tokens_total", L("model", "tiny"), 10},
		expectation{"mlx_fleet_completion_tokens_total", L("model", "big"), 7},
		expectation{"mlx_fleet_job_attempts", nil, 5}, // j5 never ran
		expectation{"mlx_fleet_results_messages", nil, 6},
	)
	mfs := s.families()
	if _, ok := value(mfs, "mlx_fleet_job_errors_total", L("code", "attempts_exhausted")); ok {
		t.Fatal("the refused second record was counted")
	}
	// TTFT is in seconds: j2's 900 ms falls in the 1 s bucket, not the 0.5 s one.
	h := mfs["mlx_fleet_job_ttft_seconds"]
	for _, m := range h.Metric {
		if m.Label[0].GetValue() != "big" {
			continue
		}
		for _, bk := range m.Histogram.Bucket {
			if bk.GetUpperBound() == 0.5 && bk.GetCumulativeCount() != 0 || bk.GetUpperBound() == 1 && bk.GetCumulativeCount() != 1 {
				t.Fatalf("ttft bucket le=%v has %d", bk.GetUpperBound(), bk.GetCumulativeCount())
			}
		}
	}
}

// TestFleetBusDown: when the bus cannot be read the gauges are left out, not
// shown stale, and the failure is counted; the counters stay.
func TestFleetBusDown(t *testing.T) {
	t.Parallel()
	b := testenv.StartBus(t, jsprov.Options{})
	ctx := testenv.Context(t, 30*time.Second)
	s := startFleet(t, b)
	s.waitFor(ctx, expectation{"mlx_fleet_queue_depth", L("priority", "normal"), 0},
		expectation{"mlx_fleet_sample_errors_total", nil, 0})
	b.Stop()
	mfs := s.waitFor(ctx, expectation{"mlx_fleet_sample_errors_total", nil, 1})
	for _, name := range []string{"mlx_fleet_queue_depth", "mlx_fleet_dlq_messages", "mlx_fleet_workers"} {
		if _, ok := mfs[name]; ok {
			t.Fatalf("%s shown while the bus is down", name)
		}
	}
}
