// Package metrics owns every Prometheus metric mlx-serving exports: their names,
// help, types and labels are the one table in this file, and the collectors that
// fill them live beside it — the fleet observer (queue depth, DLQ, terminal
// results, latency and throughput per model, worker capacity, all read from the
// bus), the dispatcher's counters, the worker's hooks and the gateway's HTTP
// metrics. Every process serves one registry (Default) on /metrics.
//
// Fleet metrics (mlx_fleet_*) are the same from every process that observes the
// bus: aggregate them across instances with max, never sum. Per-process metrics
// (mlx_dispatcher_*, mlx_worker_*, mlx_gateway_*) add up across instances.
package metrics

import (
	"sort"

	"github.com/prometheus/client_golang/prometheus"
)

// Kind is a metric type.
type Kind string

// Metric kinds.
const (
	Counter   Kind = "counter"
	Gauge     Kind = "gauge"
	Histogram Kind = "histogram"
)

// Spec describes one metric.
type Spec struct {
	Name    string
	Help    string
	Kind    Kind
	Labels  []string
	Buckets []float64 // histograms only
}

// Buckets shared by several histograms.
var (
	latencyBuckets    = []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}
	durationBuckets   = []float64{0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}
	throughputBuckets = []float64{1, 5, 10, 20, 40, 60, 80, 100, 150, 200, 400}
	batchBuckets      = []float64{1, 2, 4, 8, 16, 32, 64}
	attemptBuckets    = []float64{1, 2, 3, 4, 5, 8}
	httpBuckets       = []float64{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}
)

// The catalog. Names follow Prometheus conventions: _total for counters, base
// units (seconds), the component as the second word.
var (
	// Fleet: observed on the bus.
	FleetQueueDepth = Spec{"mlx_fleet_queue_depth", "Jobs in JOBS by priority: waiting for a dispatcher or held by one, not yet terminal.", Gauge, []string{"priority"}, nil}
	FleetDLQ        = Spec{"mlx_fleet_dlq_messages", "Dead-lettered jobs kept in the DLQ stream.", Gauge, nil, nil}
	FleetResults    = Spec{"mlx_fleet_results_messages", "Terminal records kept in the RESULTS stream.", Gauge, nil, nil}
	FleetWorkers    = Spec{"mlx_fleet_workers", "Workers in the registry (KV mlx_workers) by heartbeat state.", Gauge, []string{"state"}, nil}
	FleetSlots      = Spec{"mlx_fleet_worker_slots", "Concurrent generations a worker offers, from its heartbeat.", Gauge, []string{"worker_id"}, nil}
	FleetInFlight   = Spec{"mlx_fleet_worker_in_flight", "Jobs running on a worker, from its heartbeat.", Gauge, []string{"worker_id"}, nil}
	FleetCacheBytes = Spec{"mlx_fleet_worker_prompt_cache_bytes", "Bytes a worker's runtime prompt (KV) cache holds, from its heartbeat.", Gauge, []string{"worker_id"}, nil}
	FleetCacheHits  = Spec{"mlx_fleet_worker_prompt_cache_hit_tokens_total", "Prompt tokens a worker's runtime took from its prompt cache instead of computing them, since the runtime started (resets with it), from its heartbeat.", Counter, []string{"worker_id"}, nil}
	FleetCacheToks  = Spec{"mlx_fleet_worker_prompt_cache_prompt_tokens_total", "Prompt tokens of every cache lookup of a worker's runtime since it started (resets with it), from its heartbeat; hit_tokens over it is the token hit rate.", Counter, []string{"worker_id"}, nil}
	FleetCacheRate  = Spec{"mlx_fleet_worker_prompt_cache_hit_rate", "Share of a worker's prompt tokens served from its runtime's prompt cache since the runtime started, from its heartbeat.", Gauge, []string{"worker_id"}, nil}
	FleetSampleErrs = Spec{"mlx_fleet_sample_errors_total", "Scrapes whose read of the streams or the worker registry failed (their gauges are left out).", Counter, nil, nil}
	FleetFinished   = Spec{"mlx_fleet_jobs_finished_total", "Terminal results recorded in RESULTS, by status and model.", Counter, []string{"status", "model"}, nil}
	FleetErrors     = Spec{"mlx_fleet_job_errors_total", "Terminal results that carry an error, by its stable code.", Counter, []string{"code"}, nil}
	FleetInvalid    = Spec{"mlx_fleet_schema_rejections_total", "Jobs that failed the job schema and ended failed with invalid_request, by who found it (worker, dispatcher).", Counter, []string{"source"}, nil}
	FleetAttemptErr = Spec{"mlx_fleet_attempt_failures_total", "Attempts that ended without a terminal and were reported for a retry, by error code.", Counter, []string{"code"}, nil}
	FleetAttempts   = Spec{"mlx_fleet_job_attempts", "Attempts a job took until its terminal result (1: no retry).", Histogram, nil, attemptBuckets}
	FleetTTFT       = Spec{"mlx_fleet_job_ttft_seconds", "Time to the first token of completed jobs, by model, as the runtime measured it.", Histogram, []string{"model"}, latencyBuckets}
	FleetTokensPS   = Spec{"mlx_fleet_job_tokens_per_second", "Decoding speed of completed jobs, by model, as the runtime measured it.", Histogram, []string{"model"}, throughputBuckets}
	FleetQueued     = Spec{"mlx_fleet_job_queue_seconds", "Time from a job's creation to a worker taking its last attempt, by model.", Histogram, []string{"model"}, durationBuckets}
	FleetDuration   = Spec{"mlx_fleet_job_generation_seconds", "Time the runtime spent generating a completed job's last attempt, by model.", Histogram, []string{"model"}, durationBuckets}
	FleetTokens     = Spec{"mlx_fleet_completion_tokens_total", "Completion tokens of completed jobs, by model.", Counter, []string{"model"}, nil}

	// Dispatcher: one process's counters (metrics.Dispatcher, its dispatcher.Observer).
	DispatcherPulled           = Spec{"mlx_dispatcher_jobs_pulled_total", "Deliveries fetched from JOBS.", Counter, nil, nil}
	DispatcherBatches          = Spec{"mlx_dispatcher_batches_total", "Assignments a worker accepted.", Counter, nil, nil}
	DispatcherAssigned         = Spec{"mlx_dispatcher_jobs_assigned_total", "Jobs in accepted assignments (attempts started); divided by batches it is the mean batch size.", Counter, nil, nil}
	DispatcherAssignFull       = Spec{"mlx_dispatcher_assign_refused_total", "Assignments a worker answered full or rejected.", Counter, nil, nil}
	DispatcherAssignErrors     = Spec{"mlx_dispatcher_assign_errors_total", "Assignments that timed out or failed to send.", Counter, nil, nil}
	DispatcherRetries          = Spec{"mlx_dispatcher_retries_total", "Attempts scheduled after a retryable failure.", Counter, nil, nil}
	DispatcherFinished         = Spec{"mlx_dispatcher_jobs_finished_total", "Jobs this dispatcher saw reach a terminal state, by state.", Counter, []string{"state"}, nil}
	DispatcherAlreadyDone      = Spec{"mlx_dispatcher_already_finished_total", "Deliveries acked without running because RESULTS already had the job.", Counter, nil, nil}
	DispatcherNotAJob          = Spec{"mlx_dispatcher_not_a_job_total", "Messages on JOBS from which no job could be derived: dead-lettered raw and terminated.", Counter, nil, nil}
	DispatcherForged           = Spec{"mlx_dispatcher_forged_records_total", "Terminal records, attempt reports or progress events from a worker that does not run that attempt: refused.", Counter, nil, nil}
	DispatcherWorkersLost      = Spec{"mlx_dispatcher_workers_lost_total", "Workers whose registry entry was deleted or went stale while this dispatcher watched.", Counter, nil, nil}
	DispatcherDeafTicks        = Spec{"mlx_dispatcher_deaf_ticks_total", "Ticks at which the dispatcher could not have heard its workers since the last one (disconnected, reconnected, its PING unanswered, or the ticks held up): no worker is declared lost for that time. Rising steadily, dead workers are never declared lost and their jobs wait for attempt_timeout.", Counter, nil, nil}
	DispatcherWorkersRestarted = Spec{"mlx_dispatcher_workers_restarted_total", "Workers that came back as a new process (new started_at) while jobs were assigned to the old one; those jobs were retried.", Counter, nil, nil}
	DispatcherWriteFailures    = Spec{"mlx_dispatcher_record_write_failures_total", "Tries of a terminal record (with its dead letter) the store refused. A refused record is tried again while the dispatcher holds the job, and no new job is placed meanwhile; only a record that cannot fit, or a stop, hands the job back to run again. A store that refuses writes (a full disk) shows here first.", Counter, nil, nil}
	DispatcherRecordsHeld      = Spec{"mlx_dispatcher_records_held", "Terminal records held to be written again: the store refused them, or did not answer within a second. While above 0 the dispatcher places no job (queued jobs wait in JOBS); the records are stored, under the attempts that earned them, once the store takes writes.", Gauge, nil, nil}
	DispatcherIllegal          = Spec{"mlx_dispatcher_illegal_transitions_total", "Job state transitions the table refused (a bug if it moves).", Counter, nil, nil}
	DispatcherRouted           = Spec{"mlx_dispatcher_batches_routed_total", "Batches sent to a worker, by why that one: prefix_hit (it holds the lead job's prompt prefix), no_match (nobody does; least loaded), fallback_full (the warm workers are full), fallback_skew (the warm workers are too busy, route_max_skew), least_loaded (routing least_loaded).", Counter, []string{"reason"}, nil}
	DispatcherAnomalies        = Spec{"mlx_dispatcher_anomalies_total", "Messages the dispatcher ignored or corrected, by kind: bad_cancel (a cancel whose subject or body is no cancel: ignored), attempt_base_clamped (a job's metadata asked for an attempt base past the schemas' maximum: clamped), duplicate_job_message (a second JOBS message for a job it holds: terminated), oversized_progress (a progress event larger than any tracked job's could be: dropped unread), dead_letter_refused (the DLQ refused a dead letter, full or too large: the job ended with its terminal record only).", Counter, []string{"kind"}, nil}
	DispatcherTransitions      = Spec{"mlx_dispatcher_transitions_total", "Legal job state transitions, by the state left and the event.", Counter, []string{"from", "event"}, nil}
	WorkerSlots                = Spec{"mlx_worker_slots", "Concurrent generations this worker offers.", Gauge, []string{"worker_id"}, nil}
	WorkerInFlight             = Spec{"mlx_worker_in_flight", "Jobs holding a slot on this worker.", Gauge, []string{"worker_id"}, nil}
	WorkerState                = Spec{"mlx_worker_state", "1 for the worker's lifecycle state (starting, ready, busy, unavailable, draining, stopped), 0 for the others.", Gauge, []string{"worker_id", "state"}, nil}
	WorkerRuntimeStarts        = Spec{"mlx_worker_runtime_starts_total", "Runtime starts (and half-open probes), by result: ok when it passed runtime.info, the model loads and a health check.", Counter, []string{"worker_id", "result"}, nil}
	WorkerRuntimeRestarts      = Spec{"mlx_worker_runtime_restarts_total", "Times a runtime that was up crashed or failed its health check and was restarted.", Counter, []string{"worker_id"}, nil}
	WorkerBreaker              = Spec{"mlx_worker_breaker_state", "1 for the runtime circuit breaker's state (closed, open, half-open), 0 for the others.", Gauge, []string{"worker_id", "state"}, nil}
	WorkerBreakerOpens         = Spec{"mlx_worker_breaker_opens_total", "Times the runtime circuit breaker opened.", Counter, []string{"worker_id"}, nil}
	WorkerAssignments          = Spec{"mlx_worker_assignments_total", "Assignments answered, by status (accepted, full, rejected).", Counter, []string{"worker_id", "status"}, nil}
	WorkerBatchSize            = Spec{"mlx_worker_batch_size", "Jobs per accepted assignment.", Histogram, []string{"worker_id"}, batchBuckets}
	WorkerSchemaRejections     = Spec{"mlx_worker_schema_rejections_total", "Assigned jobs that failed the job schema (ended failed, invalid_request).", Counter, []string{"worker_id"}, nil}
	WorkerJobsStarted          = Spec{"mlx_worker_jobs_started_total", "Attempts started on this worker, by model.", Counter, []string{"worker_id", "model"}, nil}
	WorkerJobsResumed          = Spec{"mlx_worker_jobs_resumed_total", "Attempts that continue text an earlier attempt streamed: jobs that migrated here, by model.", Counter, []string{"worker_id", "model"}, nil}
	WorkerJobsFinished         = Spec{"mlx_worker_jobs_finished_total", "Terminal results this worker recorded, by model and status.", Counter, []string{"worker_id", "model", "status"}, nil}
	WorkerAttemptsReported     = Spec{"mlx_worker_attempts_reported_total", "Attempts this worker ended without a terminal and reported for a retry, by code.", Counter, []string{"worker_id", "code"}, nil}
	GatewayRequests            = Spec{"mlx_gateway_http_requests_total", "HTTP requests answered, by endpoint and status code (499: the client left first).", Counter, []string{"endpoint", "code"}, nil}
	GatewayDuration            = Spec{"mlx_gateway_http_request_duration_seconds", "Time from request to the end of the response, by endpoint.", Histogram, []string{"endpoint"}, httpBuckets}
	GatewayInFlight            = Spec{"mlx_gateway_http_requests_in_flight", "HTTP requests being served now.", Gauge, nil, nil}
	GatewaySubmitted           = Spec{"mlx_gateway_jobs_submitted_total", "Jobs queued on the bus, by endpoint.", Counter, []string{"endpoint"}, nil}
	GatewayErrors              = Spec{"mlx_gateway_errors_total", "Error answers, by OpenAI error code (queue_full, model_not_available, invalid_value, ...).", Counter, []string{"code"}, nil}
	GatewayDisconnects         = Spec{"mlx_gateway_client_disconnects_total", "Jobs cancelled because their client went away.", Counter, nil, nil}
	GatewayStalls              = Spec{"mlx_gateway_client_write_timeouts_total", "Clients dropped because they took no write within gateway_write_timeout (a stream's jobs are cancelled and counted as disconnects too).", Counter, nil, nil}
	GatewayPromptTokens        = Spec{"mlx_gateway_prompt_tokens_total", "Prompt tokens of completed jobs, as the runtime counted them.", Counter, nil, nil}
	GatewayCompletionTokens    = Spec{"mlx_gateway_completion_tokens_total", "Completion tokens of completed jobs, as the runtime counted them.", Counter, nil, nil}
	GatewayMissedEvents        = Spec{"mlx_gateway_stream_missed_events_total", "Token events lost on reply subjects (gaps in the attempt/seq numbering).", Counter, nil, nil}
	GatewayRecovered           = Spec{"mlx_gateway_results_recovered_total", "Terminal results read from RESULTS because their event was not seen.", Counter, nil, nil}
	GatewayTenantRefusals      = Spec{"mlx_gateway_tenant_refusals_total", "Requests refused by a tenant limit, by tenant and code.", Counter, []string{"tenant", "code"}, nil}
)

// catalog lists every Spec above; Catalog and the tests read it.
var catalog = []Spec{
	FleetQueueDepth, FleetDLQ, FleetResults, FleetWorkers, FleetSlots, FleetInFlight, FleetSampleErrs,
	FleetCacheBytes, FleetCacheHits, FleetCacheToks, FleetCacheRate,
	FleetFinished, FleetErrors, FleetInvalid, FleetAttemptErr, FleetAttempts, FleetTTFT, FleetTokensPS,
	FleetQueued, FleetDuration, FleetTokens,
	DispatcherPulled, DispatcherBatches, DispatcherAssigned, DispatcherAssignFull, DispatcherAssignErrors,
	DispatcherRetries, DispatcherFinished, DispatcherAlreadyDone, DispatcherNotAJob, DispatcherForged, DispatcherWorkersLost, DispatcherDeafTicks, DispatcherWorkersRestarted, DispatcherIllegal, DispatcherWriteFailures, DispatcherRecordsHeld,
	DispatcherTransitions, DispatcherRouted, DispatcherAnomalies,
	WorkerSlots, WorkerInFlight, WorkerState, WorkerRuntimeStarts, WorkerRuntimeRestarts, WorkerBreaker,
	WorkerBreakerOpens, WorkerAssignments, WorkerBatchSize, WorkerSchemaRejections, WorkerJobsStarted,
	WorkerJobsResumed, WorkerJobsFinished, WorkerAttemptsReported,
	GatewayRequests, GatewayDuration, GatewayInFlight, GatewaySubmitted, GatewayErrors, GatewayDisconnects, GatewayStalls,
	GatewayPromptTokens, GatewayCompletionTokens, GatewayMissedEvents, GatewayRecovered, GatewayTenantRefusals,
}

// Catalog returns every metric mlx-serving defines, sorted by name.
func Catalog() []Spec {
	out := append([]Spec(nil), catalog...)
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Lookup returns the Spec of a metric name, also for a histogram's _bucket, _sum
// and _count series.
func Lookup(name string) (Spec, bool) {
	for _, s := range catalog {
		if s.Name == name {
			return s, true
		}
		if s.Kind == Histogram {
			for _, suf := range []string{"_bucket", "_sum", "_count"} {
				if s.Name+suf == name {
					return s, true
				}
			}
		}
	}
	return Spec{}, false
}

// Desc is the Spec's descriptor, for collectors that build const metrics.
func (s Spec) Desc() *prometheus.Desc {
	return prometheus.NewDesc(s.Name, s.Help, s.Labels, nil)
}

func (s Spec) counterVec() *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{Name: s.Name, Help: s.Help}, s.Labels)
}

func (s Spec) gaugeVec() *prometheus.GaugeVec {
	return prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: s.Name, Help: s.Help}, s.Labels)
}

func (s Spec) histogramVec() *prometheus.HistogramVec {
	return prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: s.Name, Help: s.Help, Buckets: s.Buckets}, s.Labels)
}

func (s Spec) counter() prometheus.Counter {
	return prometheus.NewCounter(prometheus.CounterOpts{Name: s.Name, Help: s.Help})
}

func (s Spec) gauge() prometheus.Gauge {
	return prometheus.NewGauge(prometheus.GaugeOpts{Name: s.Name, Help: s.Help})
}

func (s Spec) histogram() prometheus.Histogram {
	return prometheus.NewHistogram(prometheus.HistogramOpts{Name: s.Name, Help: s.Help, Buckets: s.Buckets})
}
