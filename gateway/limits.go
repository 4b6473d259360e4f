package gateway

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// DefaultTenant is the tenant of requests whose token names none, and of every
// request when the gateway has no tokens.
const DefaultTenant = "default"

// TenantLimits bound what one tenant may ask of the fleet through the gateway.
// Zero means no limit. The same limits apply to every tenant.
type TenantLimits struct {
	// MaxInFlight bounds the tenant's jobs queued or running at once; past it a
	// request is refused with 429 tenant_queue_full.
	MaxInFlight int
	// MaxTokens bounds a request's max_tokens (400 max_tokens_exceeded); a
	// request that names none is given this bound.
	MaxTokens int
	// MaxPromptChars bounds the prompt, or the sum of the messages' contents, in
	// characters (400 prompt_too_large).
	MaxPromptChars int
	// RequestsPerSecond and Burst rate-limit the tenant's requests to /v1 (429
	// rate_limit_exceeded). Burst defaults to RequestsPerSecond rounded up.
	RequestsPerSecond float64
	Burst             int
}

// Refusal codes of the tenant limits, stable for clients and dashboards.
const (
	codeRateLimited   = "rate_limit_exceeded"
	codeTenantQueue   = "tenant_queue_full"
	codeMaxTokens     = "max_tokens_exceeded"
	codePromptTooLong = "prompt_too_large"
)

// tenantPattern is the job schema's pattern for a tenant: a token naming another
// tenant would make every one of its jobs invalid.
var tenantPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,63}$`)

type tenantKey struct{}

// tenantOf is the tenant requireTenant found for r.
func tenantOf(r *http.Request) string {
	if t, ok := r.Context().Value(tenantKey{}).(string); ok {
		return t
	}
	return DefaultTenant
}

// limiter holds every tenant's rate bucket and in-flight count.
type limiter struct {
	limits   TenantLimits
	mu       sync.Mutex
	buckets  map[string]*rate.Limiter
	inFlight map[string]int
}

func newLimiter(l TenantLimits) *limiter {
	if l.RequestsPerSecond > 0 && l.Burst <= 0 {
		l.Burst = int(l.RequestsPerSecond + 0.999)
	}
	return &limiter{
		limits:   l,
		buckets:  map[string]*rate.Limiter{},
		inFlight: map[string]int{},
	}
}

func (l *limiter) allow(tenant string, now time.Time) bool {
	if l.limits.RequestsPerSecond <= 0 {
		return true
	}
	l.mu.Lock()
	b := l.buckets[tenant]
	if b == nil {
		b = rate.NewLimiter(rate.Limit(l.limits.RequestsPerSecond), l.limits.Burst)
		l.buckets[tenant] = b
	}
	l.mu.Unlock()
	return b.AllowN(now, 1)
}

// acquire takes one in-flight slot of tenant; ok is false at the limit.
func (l *limiter) acquire(tenant string) (release func(), ok bool) {
	if l.limits.MaxInFlight <= 0 {
		return func() {}, true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.inFlight[tenant] >= l.limits.MaxInFlight {
		return nil, false
	}
	l.inFlight[tenant]++
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			l.inFlight[tenant]--
			l.mu.Unlock()
		})
	}, true
}

// requireTenant authenticates /v1 requests (when tokens are configured), puts
// the token's tenant in the request's context and applies the tenant's rate.
func (g *Gateway) requireTenant(endpoint string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tenant, aerr := g.tenants.authenticate(r)
		if aerr != nil {
			writeError(w, aerr)
			return
		}
		if !g.limits.allow(tenant, time.Now()) {
			g.refuse(w, endpoint, tenant, &apiError{Status: http.StatusTooManyRequests, Type: typeRateLimit,
				Code: codeRateLimited, RetryAfter: time.Second,
				Message: fmt.Sprintf("Rate limit reached for tenant %q: %g requests per second.", tenant, g.limits.limits.RequestsPerSecond)})
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), tenantKey{}, tenant)))
	})
}

// admit applies the tenant's per-job limits to job and sets its tenant (serve
// took the tenant's in-flight slot before reading the body).
func (g *Gateway) admit(r *http.Request, job *schemas.JobRequest) *apiError {
	tenant := tenantOf(r)
	job.Tenant = tenant
	lim := g.limits.limits
	if lim.MaxTokens > 0 {
		switch {
		case job.MaxTokens > lim.MaxTokens:
			return &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: "max_tokens", Code: codeMaxTokens,
				Message: fmt.Sprintf("max_tokens is %d; this API key allows at most %d.", job.MaxTokens, lim.MaxTokens)}
		case job.MaxTokens == 0:
			job.MaxTokens = lim.MaxTokens
		}
	}
	if lim.MaxPromptChars > 0 {
		n := len([]rune(job.Prompt))
		for _, m := range job.Messages {
			n += len([]rune(m.Content))
			for _, c := range m.ToolCalls {
				n += len([]rune(c.Function.Name)) + len([]rune(c.Function.Arguments))
			}
		}
		param := "prompt"
		if len(job.Messages) > 0 {
			param = "messages"
		}
		if len(job.Tools) > 0 && n <= lim.MaxPromptChars {
			// The tools are rendered into the prompt too: count them as sent.
			raw, _ := json.Marshal(job.Tools)
			n, param = n+len([]rune(string(raw))), "tools"
		}
		if n > lim.MaxPromptChars {
			return &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: param, Code: codePromptTooLong,
				Message: fmt.Sprintf("The prompt has %d characters; this API key allows at most %d.", n, lim.MaxPromptChars)}
		}
	}
	return nil
}

// errTenantQueueFull refuses a request of a tenant with max jobs in flight.
func errTenantQueueFull(tenant string, max int, retryAfter time.Duration) *apiError {
	return &apiError{Status: http.StatusTooManyRequests, Type: typeRateLimit, Code: codeTenantQueue, RetryAfter: retryAfter,
		Message: fmt.Sprintf("Tenant %q has %d jobs queued or running, its limit; retry later.", tenant, max)}
}

// refuse answers a request a tenant limit refused, counting it by tenant and code.
func (g *Gateway) refuse(w http.ResponseWriter, endpoint, tenant string, e *apiError) {
	g.obs.TenantRefused(tenant, e.Code)
	g.log.Info().Str("tenant", tenant).Str("code", e.Code).Str("endpoint", endpoint).Msg("tenant limit refused a request")
	g.fail(w, endpoint, e)
}

// connShares: one tenant has at most 1/connShares of the connection bound
// in requests at once — a quarter, as bodyShares is for body bytes, for the
// same reason.
const connShares = 4

// tenantConns bounds the requests one tenant has inside the gateway at once
// — a body being read, a job queued or generating, a stream open — to share,
// a quarter of gateway_max_conns, when the gateway serves more than one
// tenant (0: no bound). Each such request holds a connection the connection
// bound never closes (connlimit.go), so without it one tenant took them all:
// slow bodies (keyed ones skip the in-flight slot while the tenant holds a
// keyed job), or complete jobs left waiting in the queue under the default
// tenant_max_in_flight of 0 — and every other tenant's connections, /healthz
// included, were closed for as long as those requests lasted, up to the
// request timeout (red team round 23, F3 and its second pass). As with the
// body budget's share, three quarters stay out of any one tenant's reach. A
// gateway of one tenant has nobody to keep out, and its clients may use
// every connection.
type tenantConns struct {
	mu    sync.Mutex
	share int
	n     map[string]int
}

// bound sets the share (at least 1) and returns it.
func (c *tenantConns) bound(share int) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.share = max(share, 1)
	return c.share
}

// shareNow is the share, for messages.
func (c *tenantConns) shareNow() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.share
}

// enter counts one more request of tenant if its share allows; leave must
// follow one that does (calling it again does nothing).
func (c *tenantConns) enter(tenant string) (leave func(), ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.share <= 0 {
		return func() {}, true
	}
	if c.n[tenant] >= c.share {
		return nil, false
	}
	if c.n == nil {
		c.n = map[string]int{}
	}
	c.n[tenant]++
	var once sync.Once
	return func() {
		once.Do(func() {
			c.mu.Lock()
			defer c.mu.Unlock()
			if c.n[tenant]--; c.n[tenant] <= 0 {
				delete(c.n, tenant) // tenants come and go: the map does not keep them
			}
		})
	}, true
}

// codeTenantConns answers a request past its tenant's share of connections.
const codeTenantConns = "tenant_connections_full"

func errTenantConnsFull(tenant string, share int, retryAfter time.Duration) *apiError {
	return &apiError{Status: http.StatusTooManyRequests, Type: typeRateLimit, Code: codeTenantConns, RetryAfter: retryAfter,
		Message: fmt.Sprintf("Tenant %q has %d requests in progress at the gateway, a quarter of its connections and one tenant's most; retry later.", tenant, share)}
}
