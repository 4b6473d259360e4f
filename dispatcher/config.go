package dispatcher

import (
	"errors"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/internal/placement"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// DefaultWeights are the weights of schemas.Priorities, declared beside them
// (schemas.PriorityWeights).
var DefaultWeights = schemas.PriorityWeights

// Config configures a Dispatcher. Zero values take the defaults noted.
type Config struct {
	// DispatcherID names this process in assignments and DLQ records. Required.
	DispatcherID string
	// Conn is the NATS connection (JetStream enabled on the server). Required.
	Conn *nats.Conn
	// PlacementKey signs every placement into its assignment and checks the
	// token of a record offered for adoption (adopt.go). Dispatchers that are
	// to adopt one another's records need the same key: cmd/mlx-serving
	// derives it from the credential they connect with. The zero Key is the
	// key of no secret (anyone can forge it; use it without authentication).
	PlacementKey placement.Key

	// MaxWait is how long the first job of a model waits for others to join its
	// batch (default 5 ms), and only while more jobs are behind it in JOBS: a
	// lone job leaves at once.
	MaxWait time.Duration
	// MaxBatch caps the jobs of one assignment (default 8).
	MaxBatch int
	// AttachTimeout bounds how long Run retries reaching JetStream at start (a
	// cluster electing a leader times out for a while); default 2 minutes.
	AttachTimeout time.Duration
	// ModelWait is how long a job waits for a model that live workers exist for
	// but none has loaded, before it is dead-lettered as model_not_available
	// (default 10 s). With no live worker at all, jobs wait indefinitely.
	ModelWait time.Duration
	// MaxAttempts caps the attempts of a job before it is dead-lettered (default 3).
	MaxAttempts int
	// AckWait is the JOBS consumers' ack wait (default 30 s); held jobs are kept
	// alive with in-progress acks every AckWait/3.
	AckWait time.Duration
	// MaxAckPending bounds the jobs in flight per priority consumer (default 1024).
	MaxAckPending int
	// AssignTimeout bounds one assignment request/reply (default 5 s).
	AssignTimeout time.Duration
	// WorkerTTL: a worker whose registry entry was not updated for this long is
	// lost (default 10 s; keep it equal to the bucket's TTL).
	WorkerTTL time.Duration
	// BackoffInitial, BackoffMax and BackoffMultiplier shape the exponential
	// backoff (with ±50% jitter) between attempts (defaults 250 ms, 10 s, 2).
	BackoffInitial    time.Duration
	BackoffMax        time.Duration
	BackoffMultiplier float64
	// BreakerThreshold consecutive assignment failures open a worker's breaker
	// (default 3) for BreakerCooldown (default 5 s), then one probe is let through.
	BreakerThreshold int
	BreakerCooldown  time.Duration
	// Weights of schemas.Priorities (high, normal, low) for weighted fair
	// selection; DefaultWeights when all zero.
	Weights [schemas.NumPriorities]int
	// DrainTimeout bounds how long Run, once its context is cancelled, keeps
	// in-progress-acking jobs running on workers so their terminal state is
	// acked by this process (default AckWait). Zero-or-negative after defaults
	// only via NoDrain.
	DrainTimeout time.Duration
	// NoDrain makes Run return at once on cancel, leaving running jobs to be
	// redelivered (and recognised through RESULTS) elsewhere; terminal writes
	// already in flight still get WriteGrace.
	NoDrain bool
	// WriteGrace bounds how long Run, once its context is cancelled and the
	// running jobs drained (or left), waits for terminal records already being
	// written (and worker hand-overs already received) to be stored and their
	// jobs acked, before it cancels what is left, whose jobs are then naked
	// (default 10 s). Cancelling them at once would run finished jobs again.
	WriteGrace time.Duration
	// DeadlineGrace is how long past a job's deadline its worker may take to
	// end it (the worker stops a job at its deadline and hands over an expired
	// record) before this dispatcher ends it itself: it tells the worker to
	// stop and writes the expired record (default 10 s). A worker that holds a
	// job and never answers — hung, or a credential used to black-hole work
	// (the red team's R3-5) — then keeps a job with a deadline no longer than
	// this past it; any attempt, AttemptTimeout.
	DeadlineGrace time.Duration
	// AttemptTimeout bounds one attempt on a worker, from its offer to its
	// end (default 1 h). Past it the dispatcher gives the attempt up: it tells
	// the worker to stop that attempt, counts a failure against the worker's
	// breaker and retries the job elsewhere (schemas.CodeAttemptTimeout), so
	// a job ends even without a deadline when its worker holds it and never
	// answers while heart-beating (a hung agent, or a worker credential used
	// to black-hole work: the red team's N2), after at most MaxAttempts such
	// attempts. Set it above the longest generation a worker may honestly
	// take: an attempt cut short starts again elsewhere.
	AttemptTimeout time.Duration
	// Routing is the routing policy: RoutingPrefix (default) or
	// RoutingLeastLoaded (router.go).
	Routing string
	// RouteMaxSkew bounds how much more loaded (a share of slots, in (0, 1])
	// the worker holding a job's prefix may be than the least loaded one before
	// the job goes to the least loaded instead (default 0.5; 1: never).
	RouteMaxSkew float64
	// ConsumerPrefix prefixes the durable consumer names (default "dispatch");
	// every dispatcher of one fleet must use the same.
	ConsumerPrefix string
	// Logger receives the dispatcher's logs (default: disabled).
	Logger *zerolog.Logger
	// Observer is told what the dispatcher does, for metrics (nil: nobody).
	Observer Observer
}

// ErrConfig is matched by errors New returns for a bad Config.
var ErrConfig = errors.New("dispatcher: bad config")

func (c Config) withDefaults() (Config, error) {
	if c.DispatcherID == "" {
		return c, errors.Join(ErrConfig, errors.New("DispatcherID is required"))
	}
	if c.Conn == nil {
		return c, errors.Join(ErrConfig, errors.New("Conn is required"))
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	defInt := func(d *int, v int) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.MaxWait, 5*time.Millisecond)
	defInt(&c.MaxBatch, 8)
	defInt(&c.MaxAttempts, 3)
	def(&c.ModelWait, 10*time.Second)
	def(&c.AttachTimeout, 2*time.Minute)
	def(&c.AckWait, 30*time.Second)
	defInt(&c.MaxAckPending, 1024)
	def(&c.AssignTimeout, 5*time.Second)
	def(&c.WorkerTTL, 10*time.Second)
	def(&c.BackoffInitial, 250*time.Millisecond)
	def(&c.BackoffMax, 10*time.Second)
	if c.BackoffMultiplier < 1 {
		c.BackoffMultiplier = 2
	}
	defInt(&c.BreakerThreshold, 3)
	def(&c.BreakerCooldown, 5*time.Second)
	if c.Weights == [schemas.NumPriorities]int{} {
		c.Weights = DefaultWeights
	}
	for i := range c.Weights {
		if c.Weights[i] <= 0 {
			return c, errors.Join(ErrConfig, errors.New("Weights must all be positive"))
		}
	}
	def(&c.DrainTimeout, c.AckWait)
	def(&c.WriteGrace, 10*time.Second)
	def(&c.DeadlineGrace, 10*time.Second)
	def(&c.AttemptTimeout, time.Hour)
	switch c.Routing {
	case "":
		c.Routing = RoutingPrefix
	case RoutingPrefix, RoutingLeastLoaded:
	default:
		return c, errors.Join(ErrConfig, errors.New("Routing must be prefix or least_loaded"))
	}
	if c.RouteMaxSkew <= 0 {
		c.RouteMaxSkew = 0.5
	}
	if c.ConsumerPrefix == "" {
		c.ConsumerPrefix = "dispatch"
	}
	if c.Logger == nil {
		l := zerolog.Nop()
		c.Logger = &l
	}
	return c, nil
}
