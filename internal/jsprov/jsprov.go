// Package jsprov provisions the bus: the JetStream streams (JOBS, RESULTS, DLQ,
// CANCELS, LEDGER) and KV buckets (workers, models) with their configurations, which it
// owns — including the rollups it denies on the buckets — and reads the JOBS
// queue depths. Dispatchers, `mlx-serving up` and the tests provision; producers
// never do.
package jsprov

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Options sizes the streams and the worker registry. Zero values take the
// documented defaults.
type Options struct {
	// Replicas of every stream and the bucket: 1 on a single server, 3 in a cluster.
	// 0 keeps what existing streams have (1 for new ones), so a dispatcher started
	// without the setting cannot scale a cluster's streams down.
	Replicas int
	// JobsMaxMsgs and JobsMaxBytes bound the queue; past them a producer gets
	// bus.ErrQueueFull (discard-new). Defaults 100000 and 1 GiB.
	JobsMaxMsgs  int64
	JobsMaxBytes int64
	// JobsMaxMsgSize caps one job; 0 leaves it to the server's max payload.
	JobsMaxMsgSize int32
	// DuplicateWindow is how long a job id (Nats-Msg-Id) is remembered; default 2m.
	DuplicateWindow time.Duration
	// ResultsMaxAge is how long terminal records are kept; default 7 days.
	ResultsMaxAge time.Duration
	// DLQMaxAge is how long dead letters are kept; default 30 days.
	DLQMaxAge time.Duration
	// DLQMaxBytes bounds the DLQ; past it a new dead letter is refused
	// (discard-new) and its job ends with its terminal record alone
	// (dispatcher.Metrics.DeadLettersRefused). Default DefaultDLQMaxBytes; -1
	// is no limit (tests of a stream provisioned before the bound).
	DLQMaxBytes int64
	// CancelsMaxAge is how long cancel requests are kept; default 24h.
	CancelsMaxAge time.Duration
	// CancelsMaxMsgs, CancelsMaxBytes and CancelsMaxMsgSize bound CANCELS; past
	// them a cancel is refused (discard-new) and its publisher gets
	// bus.ErrStreamFull or bus.ErrTooLarge. Defaults DefaultCancelsMaxMsgs,
	// DefaultCancelsMaxBytes and DefaultCancelsMaxMsgSize; -1 is no limit
	// (tests of a stream provisioned before the bounds).
	CancelsMaxMsgs    int64
	CancelsMaxBytes   int64
	CancelsMaxMsgSize int32
	// WorkerTTL is how long a worker stays registered without a heartbeat; default 10s.
	WorkerTTL time.Duration
	// WorkersMaxBytes and ModelsMaxBytes bound the two buckets; defaults
	// DefaultWorkersMaxBytes and DefaultModelsMaxBytes, -1 no limit. Their
	// values are bounded by WorkersMaxValueSize and ModelsMaxValueSize.
	WorkersMaxBytes int64
	ModelsMaxBytes  int64
	// ModelGrace is how long a model stays known after the last worker that served
	// it went away (the subjects.BucketModels TTL); default DefaultModelGrace.
	ModelGrace time.Duration
	// Storage of streams and bucket; the zero value is file storage.
	Storage jetstream.StorageType
}

// DefaultModelGrace is how long a model stays known after its last worker went
// away: producers (subjects.BucketModels) and the gateway (its 404) both use it.
const DefaultModelGrace = 5 * time.Minute

// CANCELS' default bounds. Without them one producer credential filled the
// disk (300 cancels of 1 MB: 287 MB in 1.4 s) and knocked out every dispatcher,
// which reads every stored cancel at start and keeps each in memory.
const (
	// DefaultCancelsMaxMsgSize: a cancel body (schemas/cancel.json) is a job
	// id and tenant of at most 64 characters, a timestamp of at most 64 and a
	// reason of at most 1024 characters, which JSON escaping can turn into
	// 6 KiB at worst; 8 KiB leaves room for headers (trace context).
	DefaultCancelsMaxMsgSize = 8 << 10
	// DefaultCancelsMaxMsgs: every dispatcher remembers each stored cancel
	// (job key and time, at most ~300 bytes with the longest tenant and id),
	// so 100,000 cost at most ~30 MB of its 64 MB memory target.
	DefaultCancelsMaxMsgs = 100_000
	// DefaultCancelsMaxBytes: what 100,000 ordinary cancels (~250 bytes each
	// stored) take, with room to spare; 8,000 of the largest fill it.
	DefaultCancelsMaxBytes = 64 << 20
)

// DefaultDLQMaxBytes bounds the DLQ. Unbounded, one tenant's producer filled
// the disk through it (red team R3-3: jobs for a model nobody announced are
// dead-lettered at once, each letter keeps the whole job for 30 days; 200 jobs
// of 256 KB prompts added 52.5 MB in 1.8 s), and a full disk stops JetStream
// for every tenant. 256 MiB holds some 60,000 letters of ordinary jobs (a few
// KB each), 256 of the largest. Not more: the server reserves every stream's
// byte bound in its JetStream store up front, and with JOBS' 1 GiB, CANCELS'
// and the buckets' it needs about 1.4 GiB free (a 1 GiB DLQ made provisioning
// fail on a 1.5 GiB store: "insufficient storage resources").
const DefaultDLQMaxBytes = 256 << 20

// The buckets' bounds. A worker credential may put any key of BucketModels
// (auth: announcing the models it serves), and unbounded it filled the disk
// (red team R3-2: 60 values of 1 MB under random keys, stored at 304 MB/s).
// Full, a bucket refuses new puts (discard-new, the KV default); what a flood
// then blocks is in docs/RELIABILITY.md.
const (
	// ModelsMaxValueSize: a value is a model name, at most 256 characters
	// (job.json's model), 1 KiB of UTF-8 at worst; twice that leaves room
	// for headers.
	ModelsMaxValueSize = 2 << 10
	// DefaultModelsMaxBytes: about 4,000 announcements of the longest
	// names (~2 KiB stored each), some 50,000 ordinary ones.
	DefaultModelsMaxBytes = 8 << 20
	// WorkersMaxValueSize: the largest heartbeat a worker builds — 64 models
	// and schemas.MaxHeartbeatPrefixes prefix hashes over them, every string
	// at its schema bound and escaped at JSON's worst (6 bytes a character)
	// — is about 210 KB (TestLargestHeartbeatFits); an ordinary one is
	// under 1 KB, 10 KB with prefixes.
	WorkersMaxValueSize = 256 << 10
	// DefaultWorkersMaxBytes: 256 of the largest heartbeats, thousands of
	// ordinary ones. A worker credential writes only its own key (one value,
	// History 1), so this bounds a fleet's credentials together.
	DefaultWorkersMaxBytes = 64 << 20
)

// LEDGER's bounds. An entry is four numbers and a subject (~250 bytes
// stored) and is written only when a job is retried in-process or handed back
// unrun, and dropped once its record is stored, so 16 MiB holds some 60,000
// jobs' entries at once. Only dispatchers may write it.
const (
	LedgerMaxBytes   = 16 << 20
	LedgerMaxMsgSize = 1 << 10
)

func (o Options) withDefaults() Options {
	if o.Replicas <= 0 {
		o.Replicas = 1
	}
	if o.JobsMaxMsgs == 0 {
		o.JobsMaxMsgs = 100_000
	}
	if o.JobsMaxBytes == 0 {
		o.JobsMaxBytes = 1 << 30
	}
	if o.DuplicateWindow <= 0 {
		o.DuplicateWindow = 2 * time.Minute
	}
	if o.ResultsMaxAge <= 0 {
		o.ResultsMaxAge = 7 * 24 * time.Hour
	}
	if o.DLQMaxAge <= 0 {
		o.DLQMaxAge = 30 * 24 * time.Hour
	}
	if o.DLQMaxBytes == 0 {
		o.DLQMaxBytes = DefaultDLQMaxBytes
	}
	if o.WorkersMaxBytes == 0 {
		o.WorkersMaxBytes = DefaultWorkersMaxBytes
	}
	if o.ModelsMaxBytes == 0 {
		o.ModelsMaxBytes = DefaultModelsMaxBytes
	}
	if o.ModelGrace <= 0 {
		o.ModelGrace = DefaultModelGrace
	}
	if o.CancelsMaxAge <= 0 {
		o.CancelsMaxAge = 24 * time.Hour
	}
	if o.CancelsMaxMsgs == 0 {
		o.CancelsMaxMsgs = DefaultCancelsMaxMsgs
	}
	if o.CancelsMaxBytes == 0 {
		o.CancelsMaxBytes = DefaultCancelsMaxBytes
	}
	if o.CancelsMaxMsgSize == 0 {
		o.CancelsMaxMsgSize = DefaultCancelsMaxMsgSize
	}
	if o.WorkerTTL <= 0 {
		o.WorkerTTL = 10 * time.Second
	}
	return o
}

// dupWindow keeps the duplicate window within a stream's max age, which the server
// requires.
func dupWindow(w, maxAge time.Duration) time.Duration {
	if maxAge > 0 && w > maxAge {
		return maxAge
	}
	return w
}

// StreamConfigs returns the configuration Provision applies, by stream name. It is
// exported so operators' tooling and tests compare against the same source.
func StreamConfigs(opts Options) map[string]jetstream.StreamConfig {
	o := opts.withDefaults()
	return map[string]jetstream.StreamConfig{
		subjects.StreamJobs: {
			Name:        subjects.StreamJobs,
			Description: "queued generation jobs, mlx.jobs.<tenant>.<priority>.<job-id>",
			// One subject filter per known priority: the server refuses what cannot
			// be a job's subject (an unknown priority, too many or too few tokens).
			Subjects:   subjects.JobsStream(),
			Retention:  jetstream.WorkQueuePolicy,
			Storage:    o.Storage,
			Replicas:   o.Replicas,
			Discard:    jetstream.DiscardNew,
			MaxMsgs:    o.JobsMaxMsgs,
			MaxBytes:   o.JobsMaxBytes,
			MaxMsgSize: o.JobsMaxMsgSize,
			// One message per job subject: a job still queued or running cannot be
			// queued again at the same priority, even after the duplicate window
			// has passed. The subject names the priority, so the client also
			// expects no message on the job's subject at any priority
			// (subjects.JobAnyPriority); a raw publisher that skips that can queue
			// one id once per priority, and a dispatcher holding one terminates the
			// other (docs/RELIABILITY.md).
			MaxMsgsPerSubject:    1,
			DiscardNewPerSubject: true,
			Duplicates:           o.DuplicateWindow,
			// Every stored job wakes the dispatchers with its headers only
			// (subjects.JobsStored): after the store, so a pull finds it, and
			// without the body, which only the pulling dispatcher needs.
			RePublish: &jetstream.RePublish{Source: subjects.Job("*", "*", "*"), Destination: subjects.JobStored("{{wildcard(2)}}"), HeadersOnly: true},
		},
		subjects.StreamResults: {
			Name:        subjects.StreamResults,
			Description: "one terminal record per job, mlx.results.<tenant>.<job-id>",
			Subjects:    []string{subjects.ResultsAll},
			Retention:   jetstream.LimitsPolicy,
			Storage:     o.Storage,
			Replicas:    o.Replicas,
			MaxMsgs:     -1,
			MaxBytes:    -1,
			MaxAge:      o.ResultsMaxAge,
			// With discard-new per subject the server itself refuses a second terminal
			// record for a job, whatever headers the second writer sends.
			MaxMsgsPerSubject:    1,
			Discard:              jetstream.DiscardNew,
			DiscardNewPerSubject: true,
			Duplicates:           dupWindow(o.DuplicateWindow, o.ResultsMaxAge),
			// Direct get names the subject in the request subject, so a producer's
			// permission can be scoped to its tenant's records; a STREAM.MSG.GET
			// names it in the body, where no permission can see it.
			AllowDirect: true,
		},
		subjects.StreamDLQ: {
			Name:        subjects.StreamDLQ,
			Description: "dead-lettered jobs, mlx.dlq.<tenant>.<job-id>; messages that were no job, mlx.dlq._raw.<jobs-seq>",
			Subjects:    []string{subjects.DLQAll},
			Retention:   jetstream.LimitsPolicy,
			Storage:     o.Storage,
			Replicas:    o.Replicas,
			MaxMsgs:     -1,
			MaxBytes:    o.DLQMaxBytes,
			MaxAge:      o.DLQMaxAge,
			// Full, the DLQ refuses a new letter and its job still gets its
			// terminal record, the job's durable answer (the letter is the
			// copy `replay` works from; dispatcher/deadletter.go). Not
			// discard-old: a flood of one tenant's dead jobs would push out
			// every tenant's letters stored before it, unseen.
			Discard:    jetstream.DiscardNew,
			Duplicates: dupWindow(o.DuplicateWindow, o.DLQMaxAge),
		},
		subjects.StreamCancels: {
			Name:        subjects.StreamCancels,
			Description: "cancel requests, mlx.cancel.<tenant>.<job-id>",
			Subjects:    []string{subjects.CancelAll},
			Retention:   jetstream.LimitsPolicy,
			Storage:     o.Storage,
			Replicas:    o.Replicas,
			MaxMsgs:     o.CancelsMaxMsgs,
			MaxBytes:    o.CancelsMaxBytes,
			MaxMsgSize:  o.CancelsMaxMsgSize,
			MaxAge:      o.CancelsMaxAge,
			// A repeated cancel replaces the earlier one; one per job is all
			// that matters (DiscardNewPerSubject is off: the per-subject limit
			// still discards the old one).
			MaxMsgsPerSubject: 1,
			// Full, CANCELS refuses the new cancel and its publisher is told
			// (bus.ErrStreamFull); the service stays up. Not discard-old: a
			// flood would then push out the real cancels stored before it, and
			// the jobs they name would run.
			Discard:    jetstream.DiscardNew,
			Duplicates: dupWindow(o.DuplicateWindow, o.CancelsMaxAge),
		},
		subjects.StreamLedger: {
			Name:        subjects.StreamLedger,
			Description: "attempt ledger, mlx.ledger.<tenant>.<job-id>: what a job's delivery count does not say (internal/ledger)",
			Subjects:    []string{subjects.LedgerAll},
			Retention:   jetstream.LimitsPolicy,
			Storage:     o.Storage,
			Replicas:    o.Replicas,
			MaxMsgs:     -1,
			MaxBytes:    LedgerMaxBytes,
			MaxMsgSize:  LedgerMaxMsgSize,
			// As long as a job can wait for its record; a dispatcher drops a
			// job's entry once its record is stored.
			MaxAge: o.ResultsMaxAge,
			// The last entry is the one read; the per-subject limit discards
			// the earlier (DiscardNewPerSubject off). Full, a write is refused
			// and the dispatcher falls back to the delivery count alone.
			MaxMsgsPerSubject: 1,
			Discard:           jetstream.DiscardNew,
			Duplicates:        dupWindow(o.DuplicateWindow, o.ResultsMaxAge),
		},
	}
}

// WorkersBucketConfig returns the worker registry bucket's configuration.
func WorkersBucketConfig(opts Options) jetstream.KeyValueConfig {
	o := opts.withDefaults()
	return bucketConfig(o, subjects.BucketWorkers, "worker registry: key = worker id, value = heartbeat JSON", o.WorkerTTL,
		WorkersMaxValueSize, o.WorkersMaxBytes)
}

// bucketConfig is a one-value-per-key bucket whose keys expire ttl after their
// last put, bounded to values of maxValue bytes and maxBytes in all.
func bucketConfig(o Options, name, description string, ttl time.Duration, maxValue int32, maxBytes int64) jetstream.KeyValueConfig {
	return jetstream.KeyValueConfig{Bucket: name, Description: description, History: 1, TTL: ttl, Storage: o.Storage, Replicas: o.Replicas,
		MaxValueSize: maxValue, MaxBytes: maxBytes}
}

// Provision creates or updates the streams and the two buckets (worker registry,
// models served). It is
// idempotent: running it again with the same options changes nothing, and a
// changed limit is applied to the existing stream without losing its messages.
func Provision(ctx context.Context, js jetstream.JetStream, opts Options) error {
	keep := opts.Replicas <= 0
	cfgs := StreamConfigs(opts)
	for _, name := range []string{subjects.StreamJobs, subjects.StreamResults, subjects.StreamDLQ, subjects.StreamCancels, subjects.StreamLedger} {
		cfg := cfgs[name]
		if keep {
			if err := retryAPI(ctx, func(ctx context.Context) (err error) {
				cfg.Replicas, err = existingReplicas(ctx, js, name, cfgs[name].Replicas)
				return err
			}); err != nil {
				return err
			}
		}
		if err := retryAPI(ctx, func(ctx context.Context) error {
			_, err := js.CreateOrUpdateStream(ctx, cfg)
			return err
		}); err != nil {
			return fmt.Errorf("bus: provision stream %s: %w", name, err)
		}
	}
	kv := WorkersBucketConfig(opts)
	if keep {
		def := kv.Replicas
		if err := retryAPI(ctx, func(ctx context.Context) (err error) {
			kv.Replicas, err = existingReplicas(ctx, js, subjects.WorkersStream, def)
			return err
		}); err != nil {
			return err
		}
	}
	mk := ModelsBucketConfig(opts)
	mk.Replicas = kv.Replicas
	for _, cfg := range []jetstream.KeyValueConfig{kv, mk} {
		if err := retryAPI(ctx, func(ctx context.Context) error {
			_, err := js.CreateOrUpdateKeyValue(ctx, cfg)
			return err
		}); err != nil {
			return fmt.Errorf("bus: provision bucket %s: %w", cfg.Bucket, err)
		}
		if err := retryAPI(ctx, func(ctx context.Context) error { return denyRollups(ctx, js, "KV_"+cfg.Bucket) }); err != nil {
			return err
		}
	}
	return nil
}

// ModelsBucketConfig returns the configuration of the bucket of recently served
// models.
func ModelsBucketConfig(opts Options) jetstream.KeyValueConfig {
	o := opts.withDefaults()
	return bucketConfig(o, subjects.BucketModels,
		"models served recently: key = ModelKey(model), value = the model name; expires ModelGrace after the last put", o.ModelGrace,
		ModelsMaxValueSize, o.ModelsMaxBytes)
}

// denyRollups turns off message rollups on stream. A KV bucket allows them (its
// Purge uses one), and a rollup header on a put to one's own key — all a
// worker's grant allows — would otherwise erase every other worker's entry
// ("Nats-Rollup: all"). Workers delete their entry (a delete marker), they
// never purge.
func denyRollups(ctx context.Context, js jetstream.JetStream, stream string) error {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return fmt.Errorf("bus: provision: %s: %w", stream, err)
	}
	cfg := s.CachedInfo().Config
	if !cfg.AllowRollup {
		return nil
	}
	cfg.AllowRollup = false
	if _, err := js.UpdateStream(ctx, cfg); err != nil {
		return fmt.Errorf("bus: provision: deny rollups on %s: %w", stream, err)
	}
	return nil
}

// existingReplicas is the replica count a stream already has, or def when it does
// not exist yet. Provisioning with Replicas 0 keeps it, so a process started with
// default settings never scales a clustered R3 stream down to one replica. Any
// other failure to read it is an error: guessing would scale the stream down.
func existingReplicas(ctx context.Context, js jetstream.JetStream, stream string, def int) (int, error) {
	st, err := js.Stream(ctx, stream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return def, nil
	}
	if err != nil {
		return 0, fmt.Errorf("bus: provision: read %s replicas: %w", stream, err)
	}
	info := st.CachedInfo()
	if info == nil || info.Config.Replicas <= 0 {
		return def, nil
	}
	return info.Config.Replicas, nil
}

// QueueDepths counts the messages in JOBS by priority (the subject's priority
// token; every message, including one not yet found to be no job). One message
// per job subject, so per-subject counts summed are the queue depths.
func QueueDepths(ctx context.Context, js jetstream.JetStream) (map[string]uint64, error) {
	jobs, err := js.Stream(ctx, subjects.StreamJobs)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", subjects.StreamJobs, err)
	}
	info, err := jobs.Info(ctx, jetstream.WithSubjectFilter(subjects.JobsAll))
	if err != nil {
		return nil, fmt.Errorf("stream %s info: %w", subjects.StreamJobs, err)
	}
	out := map[string]uint64{}
	for subj, n := range info.State.Subjects {
		// mlx.jobs.<tenant>.<priority>.<id>
		if parts := strings.Split(subj, "."); len(parts) == 5 {
			out[parts[3]] += n
		}
	}
	return out, nil
}

// NewJobHeader is the header every publish of a job on JOBS carries (the
// client's submits, replay's requeues): nothing may be stored on the job's
// subject at ANY priority. The priority is a token of the subject, so the
// stream's one-message-per-subject limit alone took the same id once per
// priority, and two dispatchers then ran both. The server checks the last
// message on the wildcard subject and refuses with "wrong last sequence"
// (jserr.IsAlreadyStored).
func NewJobHeader(tenant, jobID string) nats.Header {
	h := nats.Header{}
	h.Set(jetstream.ExpectedLastSubjSeqHeader, "0")
	h.Set(jetstream.ExpectedLastSubjSeqSubjHeader, subjects.JobAnyPriority(tenant, jobID))
	return h
}
