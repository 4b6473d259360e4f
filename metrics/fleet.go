package metrics

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// ErrFleetStarted is returned by a second Start.
var ErrFleetStarted = errors.New("metrics: fleet observer already started")

// FleetOptions configures a Fleet. Zero durations take the defaults in parentheses.
type FleetOptions struct {
	// Conn is the bus connection; required. The observer does not close it.
	Conn *nats.Conn
	// SampleTimeout bounds one read of the streams and the worker registry (2s).
	SampleTimeout time.Duration
	// MinInterval: scrapes closer together than this reuse the last read (1s), so
	// several scrapers cost the bus one read.
	MinInterval time.Duration
	Logger      zerolog.Logger
}

// Fleet observes the whole fleet from the bus: terminal results as RESULTS stores
// them (status, errors, attempts, TTFT, tokens/s per model), attempt reports, and —
// read when scraped — queue depth per priority, DLQ and RESULTS sizes and the
// workers' heartbeats. It is a prometheus.Collector; Start begins the observing.
type Fleet struct {
	opts FleetOptions
	log  zerolog.Logger
	js   jetstream.JetStream

	finished, jobErrors, invalid, attemptErrs, tokens *prometheus.CounterVec
	ttft, tps, queued, generation                     *prometheus.HistogramVec
	attempts                                          prometheus.Histogram
	sampleErrs                                        prometheus.Counter

	queueDesc, dlqDesc, resultsDesc, workersDesc, slotsDesc, inFlightDesc *prometheus.Desc
	cacheBytesDesc, cacheHitsDesc, cacheToksDesc, cacheRateDesc           *prometheus.Desc

	mu      sync.Mutex // guards the subscriptions
	started bool
	cc      jetstream.ConsumeContext
	sub     *nats.Subscription

	sampleMu sync.Mutex // one read of the bus at a time; guards the cache
	last     *fleetSample
	lastAt   time.Time

	modelsMu   sync.Mutex
	models     map[string]bool // every model a worker announced: the only model labels
	modelsRead time.Time
}

// unknownModel is the label of a model no worker announced: a producer may name
// any model, and each name would otherwise be a new series.
const unknownModel = "unknown"

// modelLabel is model if some worker announced it, else unknownModel. The
// registry is read again for a name not seen yet, at most every few seconds.
func (f *Fleet) modelLabel(model string) string {
	if model == "" {
		return "" // a record without one (its job was invalid): one bounded label
	}
	f.modelsMu.Lock()
	defer f.modelsMu.Unlock()
	if f.models[model] {
		return model
	}
	if time.Since(f.modelsRead) > modelsRefresh {
		f.modelsRead = time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		hbs, err := f.heartbeats(ctx)
		cancel()
		if err == nil {
			f.learnModels(hbs)
		}
	}
	if f.models[model] {
		return model
	}
	return unknownModel
}

// learnModels adds the models hbs announce. Callers hold modelsMu.
func (f *Fleet) learnModels(hbs []schemas.HeartbeatMsg) {
	if f.models == nil {
		f.models = map[string]bool{}
	}
	for _, hb := range hbs {
		for _, m := range hb.Models {
			f.models[m] = true
		}
	}
}

// modelsRefresh bounds how often an unseen model name makes the registry be read.
const modelsRefresh = 5 * time.Second

type fleetSample struct {
	queued   map[string]uint64
	dlq      uint64
	results  uint64
	workers  []schemas.HeartbeatMsg
	dlqOK    bool
	resultOK bool
}

// NewFleet returns an observer; nothing touches the bus until Start or a scrape.
func NewFleet(opts FleetOptions) (*Fleet, error) {
	if opts.Conn == nil {
		return nil, errors.New("metrics: FleetOptions.Conn is required")
	}
	if opts.SampleTimeout <= 0 {
		opts.SampleTimeout = 2 * time.Second
	}
	if opts.MinInterval <= 0 {
		opts.MinInterval = time.Second
	}
	js, err := bus.NewJetStream(opts.Conn)
	if err != nil {
		return nil, fmt.Errorf("metrics: jetstream: %w", err)
	}
	return &Fleet{
		opts: opts, log: opts.Logger.With().Str("component", "metrics").Logger(), js: js,
		finished:     FleetFinished.counterVec(),
		jobErrors:    FleetErrors.counterVec(),
		invalid:      FleetInvalid.counterVec(),
		attemptErrs:  FleetAttemptErr.counterVec(),
		tokens:       FleetTokens.counterVec(),
		ttft:         FleetTTFT.histogramVec(),
		tps:          FleetTokensPS.histogramVec(),
		queued:       FleetQueued.histogramVec(),
		generation:   FleetDuration.histogramVec(),
		attempts:     FleetAttempts.histogram(),
		sampleErrs:   FleetSampleErrs.counter(),
		queueDesc:    FleetQueueDepth.Desc(),
		dlqDesc:      FleetDLQ.Desc(),
		resultsDesc:  FleetResults.Desc(),
		workersDesc:  FleetWorkers.Desc(),
		slotsDesc:    FleetSlots.Desc(),
		inFlightDesc: FleetInFlight.Desc(),

		cacheBytesDesc: FleetCacheBytes.Desc(),
		cacheHitsDesc:  FleetCacheHits.Desc(),
		cacheToksDesc:  FleetCacheToks.Desc(),
		cacheRateDesc:  FleetCacheRate.Desc(),
	}, nil
}

// Start follows RESULTS from now on and subscribes to attempt reports. Results are
// read from the stream (an ordered consumer), not from the subject: a record the
// server refused as a second terminal would otherwise be counted too.
func (f *Fleet) Start(ctx context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.started {
		return ErrFleetStarted
	}
	cons, err := f.js.OrderedConsumer(ctx, subjects.StreamResults, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{subjects.ResultsAll},
		DeliverPolicy:  jetstream.DeliverNewPolicy,
	})
	if err != nil {
		return fmt.Errorf("metrics: follow %s: %w", subjects.StreamResults, err)
	}
	cc, err := cons.Consume(func(m jetstream.Msg) { f.observeResult(m.Data()) },
		jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
			f.log.Debug().Err(err).Msg("following RESULTS")
		}))
	if err != nil {
		return fmt.Errorf("metrics: follow %s: %w", subjects.StreamResults, err)
	}
	sub, err := f.opts.Conn.Subscribe(subjects.AttemptAll, func(m *nats.Msg) {
		if subjects.Sent(m.Reply) { // a relayed API answer is no worker's report
			f.observeAttempt(m.Data)
		}
	})
	if err != nil {
		cc.Stop()
		return fmt.Errorf("metrics: subscribe %s: %w", subjects.AttemptAll, err)
	}
	if err := f.opts.Conn.FlushWithContext(ctx); err != nil {
		cc.Stop()
		_ = sub.Unsubscribe()
		return fmt.Errorf("metrics: flush: %w", err)
	}
	f.cc, f.sub, f.started = cc, sub, true
	return nil
}

// Stop ends the observing; scrapes still read the gauges.
func (f *Fleet) Stop() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cc != nil {
		f.cc.Stop()
		f.cc = nil
	}
	if f.sub != nil {
		_ = f.sub.Unsubscribe()
		f.sub = nil
	}
}

// observeResult counts one stored terminal record.
func (f *Fleet) observeResult(data []byte) {
	var r schemas.ResultMsg
	if err := json.Unmarshal(data, &r); err != nil || r.JobID == "" {
		return
	}
	model := f.modelLabel(r.Model)
	f.finished.WithLabelValues(r.Status, model).Inc()
	if r.Attempt > 0 {
		f.attempts.Observe(float64(r.Attempt))
	}
	if r.Error != nil && r.Error.Code != "" {
		f.jobErrors.WithLabelValues(r.Error.Code).Inc()
		if r.Error.Code == schemas.CodeInvalidRequest {
			// A worker signs what it writes; the dispatcher does not.
			source := "dispatcher"
			if r.WorkerID != "" {
				source = "worker"
			}
			f.invalid.WithLabelValues(source).Inc()
		}
	}
	if r.Status != schemas.StatusCompleted {
		return
	}
	f.tokens.WithLabelValues(model).Add(float64(r.Usage.CompletionTokens))
	if t := r.Timings; t != nil {
		if t.TTFTMs > 0 {
			f.ttft.WithLabelValues(model).Observe(t.TTFTMs / 1000)
		}
		if t.TokensPerSec > 0 {
			f.tps.WithLabelValues(model).Observe(t.TokensPerSec)
		}
		if t.QueuedMs > 0 {
			f.queued.WithLabelValues(model).Observe(t.QueuedMs / 1000)
		}
		if t.TotalMs > 0 {
			f.generation.WithLabelValues(model).Observe(t.TotalMs / 1000)
		}
	}
}

func (f *Fleet) observeAttempt(data []byte) {
	var a schemas.AttemptReportMsg
	if err := json.Unmarshal(data, &a); err != nil || a.JobID == "" {
		return
	}
	f.attemptErrs.WithLabelValues(a.Error.Code).Inc()
}

// Describe implements prometheus.Collector.
func (f *Fleet) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{f.queueDesc, f.dlqDesc, f.resultsDesc, f.workersDesc, f.slotsDesc, f.inFlightDesc,
		f.cacheBytesDesc, f.cacheHitsDesc, f.cacheToksDesc, f.cacheRateDesc} {
		ch <- d
	}
	for _, c := range f.collectors() {
		c.Describe(ch)
	}
}

func (f *Fleet) collectors() []prometheus.Collector {
	return []prometheus.Collector{f.finished, f.jobErrors, f.invalid, f.attemptErrs, f.tokens,
		f.ttft, f.tps, f.queued, f.generation, f.attempts, f.sampleErrs}
}

// Collect implements prometheus.Collector: the bus is read now (or the read of
// less than MinInterval ago reused). What could not be read is left out rather
// than shown stale, and counted in mlx_fleet_sample_errors_total.
func (f *Fleet) Collect(ch chan<- prometheus.Metric) {
	if s := f.sampleCached(); s != nil {
		if s.queued != nil {
			for _, p := range schemas.Priorities {
				ch <- prometheus.MustNewConstMetric(f.queueDesc, prometheus.GaugeValue, float64(s.queued[p]), p)
			}
		}
		if s.dlqOK {
			ch <- prometheus.MustNewConstMetric(f.dlqDesc, prometheus.GaugeValue, float64(s.dlq))
		}
		if s.resultOK {
			ch <- prometheus.MustNewConstMetric(f.resultsDesc, prometheus.GaugeValue, float64(s.results))
		}
		if s.workers != nil {
			byState := map[string]int{schemas.WorkerReady: 0, schemas.WorkerDraining: 0, schemas.WorkerUnavailable: 0}
			for _, w := range s.workers {
				byState[w.State]++
				ch <- prometheus.MustNewConstMetric(f.slotsDesc, prometheus.GaugeValue, float64(w.Slots), w.WorkerID)
				ch <- prometheus.MustNewConstMetric(f.inFlightDesc, prometheus.GaugeValue, float64(w.InFlight), w.WorkerID)
				if pc := w.PromptCache; pc != nil {
					ch <- prometheus.MustNewConstMetric(f.cacheBytesDesc, prometheus.GaugeValue, float64(pc.Bytes), w.WorkerID)
					ch <- prometheus.MustNewConstMetric(f.cacheHitsDesc, prometheus.CounterValue, float64(pc.HitTokens), w.WorkerID)
					ch <- prometheus.MustNewConstMetric(f.cacheToksDesc, prometheus.CounterValue, float64(pc.PromptTokens), w.WorkerID)
					if pc.PromptTokens > 0 {
						ch <- prometheus.MustNewConstMetric(f.cacheRateDesc, prometheus.GaugeValue, float64(pc.HitTokens)/float64(pc.PromptTokens), w.WorkerID)
					}
				}
			}
			for st, n := range byState {
				ch <- prometheus.MustNewConstMetric(f.workersDesc, prometheus.GaugeValue, float64(n), st)
			}
		}
	}
	for _, c := range f.collectors() {
		c.Collect(ch)
	}
}

func (f *Fleet) sampleCached() *fleetSample {
	f.sampleMu.Lock()
	defer f.sampleMu.Unlock()
	if f.last != nil && time.Since(f.lastAt) < f.opts.MinInterval {
		return f.last
	}
	ctx, cancel := context.WithTimeout(context.Background(), f.opts.SampleTimeout)
	defer cancel()
	s, err := f.sample(ctx)
	if err != nil {
		f.sampleErrs.Inc()
		f.log.Debug().Err(err).Msg("fleet sample incomplete")
	}
	f.last, f.lastAt = s, time.Now()
	return s
}

// sample reads queue depth, DLQ and RESULTS sizes and the heartbeats, as
// `mlx-serving status` does; a part that fails is left nil/false, and the first
// error is returned.
func (f *Fleet) sample(ctx context.Context) (*fleetSample, error) {
	s := &fleetSample{}
	var firstErr error
	keep := func(err error) {
		if firstErr == nil {
			firstErr = err
		}
	}
	if q, err := jsprov.QueueDepths(ctx, f.js); err != nil {
		keep(err)
	} else {
		s.queued = q
	}
	s.dlq, s.dlqOK = f.streamMsgs(ctx, subjects.StreamDLQ, keep)
	s.results, s.resultOK = f.streamMsgs(ctx, subjects.StreamResults, keep)
	if workers, err := f.heartbeats(ctx); err != nil {
		keep(err)
	} else {
		s.workers = workers
	}
	return s, firstErr
}

func (f *Fleet) streamMsgs(ctx context.Context, name string, keep func(error)) (uint64, bool) {
	st, err := f.js.Stream(ctx, name)
	if err != nil {
		keep(fmt.Errorf("stream %s: %w", name, err))
		return 0, false
	}
	info, err := st.Info(ctx)
	if err != nil {
		keep(fmt.Errorf("stream %s info: %w", name, err))
		return 0, false
	}
	return info.State.Msgs, true
}

// heartbeats is the registry now; a missing bucket is an error here (the fleet
// was not provisioned), unlike in the gateway.
func (f *Fleet) heartbeats(ctx context.Context) ([]schemas.HeartbeatMsg, error) {
	return registry.Snapshot(ctx, f.js)
}
