// Package gateway serves an OpenAI-compatible HTTP API over the bus: chat and
// text completions (streamed as Server-Sent Events or as one body), the models
// the fleet has loaded, health, readiness and Prometheus metrics.
package gateway

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/mlx-serving/mlx-serving/tracing"
)

// Config configures a Gateway. Jobs and Fleet are required; the rest have
// defaults.
type Config struct {
	// Addr is the listen address; default ":8080".
	Addr string
	// Tokens, when any, are the accepted bearer tokens for /v1/*. Empty means no
	// auth (health, readiness and metrics are never authenticated).
	Tokens []string
	// TokenTenants maps further accepted tokens to the tenant their jobs run as
	// (Tokens map to DefaultTenant).
	TokenTenants map[string]string
	// Limits bound each tenant's requests (limits.go).
	Limits TenantLimits
	// Jobs submits, follows and cancels jobs (gatewaybus.New on a connection).
	Jobs Jobs
	// Fleet reads the worker registry: the models /v1/models lists and requests
	// may name, and readiness (gatewaybus's Fleet).
	Fleet Fleet
	// Logger receives request and job logs. The zero value discards them.
	Logger zerolog.Logger
	// DefaultModel is used when a request names no model.
	DefaultModel string
	// RequestTimeout bounds a request from arrival to the end of its answer; it
	// becomes the job's deadline, so the fleet stops work nobody waits for. Zero
	// means 10 minutes; negative means no limit.
	RequestTimeout time.Duration
	// RetryAfter is the hint sent with 429 when the queue is full; default 1s.
	RetryAfter time.Duration
	// ShutdownTimeout bounds Run's graceful shutdown before open streams are cut;
	// default 30s.
	ShutdownTimeout time.Duration
	// Observer is told what the gateway does (metrics.Gateway in
	// cmd/mlx-serving); nil: nobody.
	Observer Observer
	// Metrics, when set, is served unauthenticated on GET /metrics
	// (metrics.Gateway's Handler in cmd/mlx-serving).
	Metrics http.Handler
	// MaxBodyBytes bounds a request body (413 request_too_large); zero:
	// DefaultMaxBodyBytes. cmd/mlx-serving sets BodyLimitFor the connection's
	// MaxPayload, since a larger body could not become a job the bus carries.
	MaxBodyBytes int64
	// MaxBodyBytesReading bounds the bytes of request bodies held in memory at
	// once, across all requests, charged as they arrive (503
	// request_body_capacity); one tenant may hold a quarter of it, or
	// MaxBodyBytes if more. Zero: DefaultMaxBodyBytesReading. Raised to
	// MaxBodyBytes if below it.
	MaxBodyBytesReading int64
	// BodyReadTimeout bounds reading one request body (408 request_timeout);
	// zero: DefaultBodyReadTimeout; negative: no limit.
	BodyReadTimeout time.Duration
	// WorkerTTL is the registry's worker_ttl. A heartbeat older than twice it
	// is not taken as a ready worker (readRegistry): /readyz, /v1/models and
	// the model check then see no worker. Zero: heartbeats at any age count.
	WorkerTTL time.Duration
	// WriteTimeout bounds each write to a client: an SSE event, a whole
	// answer. A client that takes none within it is dropped and its jobs
	// cancelled (stall.go). Zero: DefaultWriteTimeout; negative: no limit.
	WriteTimeout time.Duration
	// MaxConns bounds the client connections held at once (connlimit.go);
	// zero: DefaultMaxConns; negative: no bound.
	MaxConns int
	// CORSOrigins are the browser origins (scheme://host[:port]) allowed to call
	// the API across origins; "*" allows any. Empty: none (no CORS headers).
	CORSOrigins []string
}

// deadlineGrace is how long the gateway waits past a job's deadline for the
// fleet's own "expired" answer before it gives up and answers 504 itself.
const deadlineGrace = 3 * time.Second

// Gateway is the HTTP front door. Build it with New, serve with Run or mount
// Handler in another server.
type Gateway struct {
	cfg      Config
	log      zerolog.Logger
	jobs     Jobs
	registry *registry
	tenants  *tenantAuth
	limits   *limiter
	holds    keyedHolds   // keyed jobs' slots held after their clients left (idempotency.go)
	submits  submitHealth // the last submit the server failed, for /readyz (storehealth.go)
	cors     *corsPolicy
	obs      Observer
	handler  http.Handler
	timeout  time.Duration // 0: none
	grace    time.Duration

	maxBody      int64
	bodies       *bodyBudget
	conns        tenantConns   // one tenant's requests at once (limits.go)
	logprobs     *bodyBudget   // logprob entries held by answers (logprobbudget.go)
	bodyTimeout  time.Duration // 0: none
	writeTimeout time.Duration // 0: none

	mu  sync.Mutex
	srv *http.Server
	ln  net.Listener
}

// New builds a Gateway on the bus that cfg.Jobs and cfg.Fleet reach.
func New(cfg Config) (*Gateway, error) {
	if cfg.Jobs == nil || cfg.Fleet == nil {
		return nil, errors.New("gateway: Config.Jobs and Config.Fleet are required")
	}
	if cfg.Observer == nil {
		cfg.Observer = nopObserver{}
	}
	if cfg.Addr == "" {
		cfg.Addr = ":8080"
	}
	if cfg.RetryAfter <= 0 {
		cfg.RetryAfter = time.Second
	}
	if cfg.ShutdownTimeout <= 0 {
		cfg.ShutdownTimeout = 30 * time.Second
	}
	timeout := cfg.RequestTimeout
	switch {
	case timeout == 0:
		timeout = 10 * time.Minute
	case timeout < 0:
		timeout = 0
	}
	maxBody := cfg.MaxBodyBytes
	if maxBody <= 0 {
		maxBody = DefaultMaxBodyBytes
	}
	reading := cfg.MaxBodyBytesReading
	if reading <= 0 {
		reading = DefaultMaxBodyBytesReading
	}
	bodyTimeout := timeoutOr(cfg.BodyReadTimeout, DefaultBodyReadTimeout)
	writeTimeout := timeoutOr(cfg.WriteTimeout, DefaultWriteTimeout)
	log := cfg.Logger.With().Str("component", "gateway").Logger()
	tenants, err := newTenantAuth(cfg.Tokens, cfg.TokenTenants)
	if err != nil {
		return nil, err
	}
	cors, err := newCORS(cfg.CORSOrigins)
	if err != nil {
		return nil, err
	}
	g := &Gateway{
		cfg:      cfg,
		log:      log,
		jobs:     cfg.Jobs,
		registry: newRegistry(cfg.Fleet, time.Second, staleHeartbeat(cfg.WorkerTTL)),
		tenants:  tenants,
		limits:   newLimiter(cfg.Limits),
		cors:     cors,
		obs:      cfg.Observer,
		timeout:  timeout,
		grace:    deadlineGrace,

		maxBody:      maxBody,
		bodies:       newBodyBudget(reading, maxBody),
		logprobs:     newBodyBudget(logprobCapacity, 0),
		bodyTimeout:  bodyTimeout,
		writeTimeout: writeTimeout,
	}
	g.handler = g.routes()
	return g, nil
}

// maxConnsOf is the connection bound cfg asks for: MaxConns, DefaultMaxConns
// for zero, ≤ 0 for none.
func maxConnsOf(cfg Config) int {
	if cfg.MaxConns == 0 {
		return DefaultMaxConns()
	}
	return cfg.MaxConns
}

func (g *Gateway) routes() http.Handler {
	mux := http.NewServeMux()
	api := func(endpoint string, h http.HandlerFunc) http.Handler {
		return g.instrument(endpoint, g.requireTenant(endpoint, h))
	}
	mux.Handle("POST /v1/chat/completions", api(endpointChat, g.handleChat))
	mux.Handle("POST /v1/completions", api(endpointCompletions, g.handleCompletions))
	mux.Handle("GET /v1/models", api(endpointModels, g.handleModels))
	mux.Handle("GET /v1/models/{model...}", api(endpointModels, g.handleModel))
	mux.HandleFunc("GET /healthz", g.handleHealth)
	mux.HandleFunc("GET /readyz", g.handleReady)
	if g.cfg.Metrics != nil {
		mux.Handle("GET /metrics", g.cfg.Metrics)
	}
	// Every known path answers another method with a JSON 405 naming the one
	// it takes: the mux's own is plain text, and on the API paths the
	// catch-all below said 404 unknown_url (red team round 17, HTTP L4).
	for path, allow := range map[string]string{
		"/v1/chat/completions": http.MethodPost, "/v1/completions": http.MethodPost,
		"/v1/models": http.MethodGet, "/v1/models/{model...}": http.MethodGet,
	} {
		mux.Handle(path, g.requireToken(methodNotAllowed(allow)))
	}
	mux.Handle("/healthz", methodNotAllowed(http.MethodGet))
	mux.Handle("/readyz", methodNotAllowed(http.MethodGet))
	if g.cfg.Metrics != nil {
		mux.Handle("/metrics", methodNotAllowed(http.MethodGet))
	}
	mux.Handle("/v1/", g.requireToken(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, &apiError{Status: http.StatusNotFound, Type: typeInvalidRequest, Code: "unknown_url",
			Message: fmt.Sprintf("Unknown request URL: %s %s.", r.Method, r.URL.Path)})
	})))
	return closeUnread(g.writeDeadlines(g.cors.wrap(mux)))
}

// methodNotAllowed answers 405 in the API's error format, naming the method
// the path takes (GET includes HEAD).
func methodNotAllowed(allow string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if allow == http.MethodGet {
			w.Header().Set("Allow", "GET, HEAD")
		} else {
			w.Header().Set("Allow", allow)
		}
		writeError(w, &apiError{Status: http.StatusMethodNotAllowed, Type: typeInvalidRequest, Code: "method_not_allowed",
			Message: fmt.Sprintf("Method %s is not allowed on %s; use %s.", r.Method, r.URL.Path, allow)})
	})
}

// Handler serves the whole API; mount it to serve the gateway elsewhere.
func (g *Gateway) Handler() http.Handler { return g.handler }

// Listen binds Config.Addr. Run calls it when needed; call it first to learn
// the bound address (Addr) of ":0" before serving.
func (g *Gateway) Listen() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.ln != nil {
		return nil
	}
	ln, err := net.Listen("tcp", g.cfg.Addr)
	if err != nil {
		return fmt.Errorf("gateway: listen %s: %w", g.cfg.Addr, err)
	}
	g.srv = &http.Server{
		Handler:           g.handler,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		// No write timeout: streamed answers last as long as generation does, and
		// RequestTimeout bounds them. Each write has a deadline of its own
		// (Config.WriteTimeout, stall.go).
	}
	if maxConns := maxConnsOf(g.cfg); maxConns > 0 {
		// The share only where the bound is: a Handler mounted elsewhere has
		// no connection bound to keep a tenant within.
		if g.tenants.count() > 1 {
			share := g.conns.bound(maxConns / connShares)
			if lim := g.cfg.Limits.MaxInFlight; lim > share {
				g.log.Warn().Int("tenant_max_in_flight", lim).Int("share", share).Int("max_conns", maxConns).
					Msg("tenant_max_in_flight is above one tenant's share of gateway_max_conns: a tenant gets 429 tenant_connections_full past the share; raise gateway_max_conns (or the open-file limit)")
			}
		}
		lim := newConnLimiter(ln, maxConns, g.connsAtBound(maxConns))
		ln, g.srv.ConnState, g.srv.ConnContext = lim, lim.track, withConn
	}
	g.ln = ln
	return nil
}

// Addr is the bound address once Listen (or Run) has run, else nil.
func (g *Gateway) Addr() net.Addr {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.ln == nil {
		return nil
	}
	return g.ln.Addr()
}

// Run serves until ctx is done, then shuts down gracefully (bounded by
// Config.ShutdownTimeout). It returns nil after a clean shutdown.
func (g *Gateway) Run(ctx context.Context) error {
	if err := g.Listen(); err != nil {
		return err
	}
	g.mu.Lock()
	srv, ln := g.srv, g.ln
	g.mu.Unlock()
	g.log.Info().Str("addr", ln.Addr().String()).Bool("auth", g.tenants.enabled()).Msg("gateway listening")

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("gateway: serve: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), g.cfg.ShutdownTimeout)
	defer cancel()
	err := g.Shutdown(sctx)
	<-errc
	return err
}

// Shutdown stops accepting requests and waits for those in flight until ctx is
// done; then it closes the remaining connections, whose jobs are cancelled as for
// any client that leaves.
func (g *Gateway) Shutdown(ctx context.Context) error {
	g.mu.Lock()
	srv := g.srv
	g.mu.Unlock()
	if srv == nil {
		return nil
	}
	if err := srv.Shutdown(ctx); err != nil {
		_ = srv.Close()
		return fmt.Errorf("gateway: shutdown: %w", err)
	}
	g.log.Info().Msg("gateway stopped")
	return nil
}

// handleHealth is liveness: the process is up and serving HTTP. It touches
// nothing else, so a fleet without workers does not get the gateway restarted.
func (g *Gateway) handleHealth(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

// handleReady is readiness: a completion sent now can be served. The bus is
// connected, the streams jobs need exist, and at least one worker is ready with a
// model loaded. Otherwise 503 with the reason.
func (g *Gateway) handleReady(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if err := g.ready(ctx); err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "not ready", "reason": err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}

func (g *Gateway) ready(ctx context.Context) error {
	if err := g.jobs.Ready(ctx); err != nil {
		return err
	}
	if err := g.submits.check(); err != nil {
		return err
	}
	v, err := g.registry.read(ctx)
	if err != nil {
		return err
	}
	if v.serving == 0 {
		if v.stale > 0 {
			return fmt.Errorf("no ready worker has a model loaded: %d of %d registered workers' heartbeats are older than twice the worker TTL (the JetStream store may be refusing writes)", v.stale, v.workers)
		}
		return fmt.Errorf("no ready worker has a model loaded (%d workers registered)", v.workers)
	}
	return nil
}

// statusRecorder remembers the status written, for metrics and logs.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the real writer to flush.
func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }

func (g *Gateway) instrument(endpoint string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		g.obs.RequestStarted()
		rec := &statusRecorder{ResponseWriter: w}
		// The caller's traceparent, if any, makes this request (and the job it
		// submits) part of the caller's trace.
		ctx, span := tracing.Tracer().Start(tracing.ExtractHTTP(r.Context(), r.Header), tracing.SpanGatewayRequest,
			trace.WithSpanKind(trace.SpanKindServer),
			trace.WithAttributes(attribute.String("http.request.method", r.Method), attribute.String("http.route", endpoint)))
		r = r.WithContext(ctx)
		defer func() {
			status := rec.status
			if status == 0 {
				status = 499 // nothing was written: the client left first
			}
			span.SetAttributes(attribute.Int("http.response.status_code", status))
			if status >= 500 {
				span.SetStatus(codes.Error, http.StatusText(status))
			}
			span.End()
			elapsed := time.Since(start)
			g.obs.RequestFinished(endpoint, status, elapsed)
			g.log.Debug().Str("method", r.Method).Str("path", r.URL.Path).Int("status", status).
				Dur("elapsed", elapsed).Msg("request")
		}()
		next.ServeHTTP(rec, r)
	})
}

// staleHeartbeat is the age past which a heartbeat is not taken as a worker's
// word (readRegistry): twice the TTL, so clock skew between a worker and the
// gateway, or a heartbeat a little late, does not take the fleet out of
// rotation; zero when the TTL is not known.
func staleHeartbeat(workerTTL time.Duration) time.Duration { return 2 * max(workerTTL, 0) }

// timeoutOr reads a Config timeout: zero is def, negative is none (0).
func timeoutOr(d, def time.Duration) time.Duration {
	switch {
	case d == 0:
		return def
	case d < 0:
		return 0
	}
	return d
}
