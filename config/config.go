// Package config owns the settings of every mlx-serving process: one table of keys,
// each settable in a YAML file, as an MLX_SERVING_* environment variable, or as a
// flag, with precedence flag > env > file > default. The effective configuration is
// validated against an embedded JSON Schema before anything starts.
package config

import (
	_ "embed"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/xeipuuv/gojsonschema"
	"sigs.k8s.io/yaml"
)

//go:embed schema.json
var schemaJSON []byte

// ErrInvalid is matched by errors from Load when the configuration breaks its schema.
var ErrInvalid = errors.New("config: invalid")

// Config is the effective configuration.
type Config struct {
	DataDir      string `json:"data_dir"`
	HTTPAddr     string `json:"http_addr"`
	NATSListen   string `json:"nats_listen"`
	NATSURL      string `json:"nats_url"`
	NATSUser     string `json:"nats_user,omitempty"`
	NATSPassword string `json:"nats_password,omitempty"`
	NATSCreds    string `json:"nats_creds,omitempty"`
	NATSCA       string `json:"nats_ca,omitempty"`
	NATSCert     string `json:"nats_cert,omitempty"`
	NATSKey      string `json:"nats_key,omitempty"`
	Model        string `json:"model"`
	Python       string `json:"python"`
	WorkerID     string `json:"worker_id"`
	Slots        int    `json:"slots"`
	SyncAlways   bool   `json:"sync_always"`
	JobsMaxMsgs  int64  `json:"jobs_max_msgs"`
	// JetStreamMaxStore bounds the embedded server's JetStream file store
	// (up); 0: the server sizes it from the free disk.
	JetStreamMaxStore int64   `json:"jetstream_max_store"`
	DLQMaxBytes       int64   `json:"dlq_max_bytes"`
	MaxAttempts       int     `json:"max_attempts"`
	BatchMaxWait      string  `json:"batch_max_wait"`
	BatchMaxSize      int     `json:"batch_max_size"`
	Routing           string  `json:"routing"`
	RouteMaxSkew      float64 `json:"route_max_skew"`
	AuthTokens        string  `json:"auth_tokens,omitempty"`
	CORSOrigins       string  `json:"cors_origins,omitempty"`
	// Per-tenant limits at the gateway; 0 means none.
	TenantMaxInFlight    int    `json:"tenant_max_in_flight"`
	TenantMaxTokens      int    `json:"tenant_max_tokens"`
	TenantMaxPromptChars int    `json:"tenant_max_prompt_chars"`
	TenantRate           int    `json:"tenant_rate"`
	TenantBurst          int    `json:"tenant_burst"`
	MetricsAddr          string `json:"metrics_addr,omitempty"`
	OTLPEndpoint         string `json:"otlp_endpoint,omitempty"`
	Replicas             int    `json:"replicas"`
	WorkerTTL            string `json:"worker_ttl"`
	LogLevel             string `json:"log_level"`
	LogFormat            string `json:"log_format"`

	// PromptCacheBytes bounds the runtime's prompt (KV) cache; 0: off, -1: the runtime's default.
	PromptCacheBytes int64 `json:"prompt_cache_bytes"`

	// How long a stopping dispatcher waits for its jobs on workers, then for
	// terminal writes under way (dispatcher.Config DrainTimeout, WriteGrace).
	DispatcherDrainTimeout string `json:"dispatcher_drain_timeout"`
	DispatcherWriteGrace   string `json:"dispatcher_write_grace"`
	// AttemptTimeout bounds one attempt on a worker (dispatcher.Config AttemptTimeout).
	AttemptTimeout string `json:"attempt_timeout"`

	// GatewayRequestTimeout bounds an HTTP request and is its job's deadline
	// (gateway.Config RequestTimeout).
	GatewayRequestTimeout string `json:"gateway_request_timeout"`
	// GatewayWriteTimeout bounds each write to an HTTP client
	// (gateway.Config WriteTimeout).
	GatewayWriteTimeout string `json:"gateway_write_timeout"`
	// GatewayMaxConns bounds the gateway's client connections
	// (gateway.Config MaxConns).
	GatewayMaxConns int `json:"gateway_max_conns"`
}

// Key documents one setting; Keys is the table the README's configuration section,
// the flags and the environment variables are all built from.
type Key struct {
	Name    string // YAML key
	Flag    string // --flag
	Env     string // MLX_SERVING_*
	Default string
	Usage   string
}

// Keys lists every setting.
var Keys = []Key{
	{"data_dir", "data-dir", "MLX_SERVING_DATA_DIR", "./data", "directory for JetStream's store, the tiny model and state"},
	{"http_addr", "http-addr", "MLX_SERVING_HTTP_ADDR", "127.0.0.1:8080", "gateway listen address"},
	{"nats_listen", "nats-listen", "MLX_SERVING_NATS_LISTEN", "127.0.0.1:4222", "embedded NATS listen address (up)"},
	{"nats_url", "nats", "MLX_SERVING_NATS_URL", "nats://127.0.0.1:4222", "NATS server URLs, comma-separated"},
	{"nats_user", "nats-user", "MLX_SERVING_NATS_USER", "", "NATS user"},
	{"nats_password", "nats-password", "MLX_SERVING_NATS_PASSWORD", "", "NATS password"},
	{"nats_creds", "nats-creds", "MLX_SERVING_NATS_CREDS", "", "NATS credentials file"},
	{"nats_ca", "nats-ca", "MLX_SERVING_NATS_CA", "", "PEM file of the CA that signed the NATS servers' TLS certificates (turns TLS on)"},
	{"nats_cert", "nats-cert", "MLX_SERVING_NATS_CERT", "", "client TLS certificate (PEM) for servers that verify clients; with nats_key"},
	{"nats_key", "nats-key", "MLX_SERVING_NATS_KEY", "", "private key (PEM) of nats_cert"},
	{"model", "model", "MLX_SERVING_MODEL", "", "model to preload: local path or hub id (empty: the tiny model)"},
	{"python", "python", "MLX_SERVING_PYTHON", "", "Python interpreter for the runtime (empty: python/.venv/bin/python)"},
	{"worker_id", "worker-id", "MLX_SERVING_WORKER_ID", "", "worker id (empty: from the host name); one process per id: a worker refuses to start while another process heart-beats under its id"},
	{"slots", "slots", "MLX_SERVING_SLOTS", "8", "concurrent generations per worker"},
	{"prompt_cache_bytes", "prompt-cache-bytes", "MLX_SERVING_PROMPT_CACHE_BYTES", "-1", "worker: bytes of finished requests' KV caches the runtime keeps to reuse shared prompt prefixes, within a tenant (0: off; -1: 1/8 of the machine's memory, at most 16 GiB)"},
	{"sync_always", "sync-always", "MLX_SERVING_SYNC_ALWAYS", "true", "fsync every JetStream write before acking it"},
	{"jobs_max_msgs", "jobs-max-msgs", "MLX_SERVING_JOBS_MAX_MSGS", "100000", "most queued jobs before submit says queue full"},
	{"jetstream_max_store", "jetstream-max-store", "MLX_SERVING_JETSTREAM_MAX_STORE", "0", "up: bytes the embedded NATS server's JetStream file store may hold; past it JetStream refuses writes (0: the server sizes it, 75% of the free disk)"},
	{"dlq_max_bytes", "dlq-max-bytes", "MLX_SERVING_DLQ_MAX_BYTES", "268435456", "bytes of dead letters the DLQ keeps; past it a new letter is refused and its job ends with its terminal record only (not replayable)"},
	{"max_attempts", "max-attempts", "MLX_SERVING_MAX_ATTEMPTS", "3", "attempts per job before it is dead-lettered"},
	{"batch_max_wait", "batch-max-wait", "MLX_SERVING_BATCH_MAX_WAIT", "5ms", "how long the dispatcher waits to fill a batch"},
	{"batch_max_size", "batch-max-size", "MLX_SERVING_BATCH_MAX_SIZE", "8", "most jobs in one batch"},
	{"routing", "routing", "MLX_SERVING_ROUTING", "prefix", "dispatcher: where a batch goes: prefix (the worker that already holds its prompt's prefix) or least_loaded"},
	{"route_max_skew", "route-max-skew", "MLX_SERVING_ROUTE_MAX_SKEW", "0.5", "dispatcher: how much busier (share of slots) a worker holding a job's prefix may be than the least loaded one; past it the least loaded gets the job"},
	{"auth_tokens", "auth-tokens", "MLX_SERVING_AUTH_TOKENS", "", "gateway bearer tokens, comma-separated; token=tenant maps a token to a tenant, a plain token is tenant default; a token listed twice is refused (empty: no auth)"},
	{"cors_origins", "cors-origins", "MLX_SERVING_CORS_ORIGINS", "", "gateway: browser origins allowed to call the API (CORS), comma-separated scheme://host[:port]; * allows any (empty: none)"},
	{"tenant_max_in_flight", "tenant-max-in-flight", "MLX_SERVING_TENANT_MAX_IN_FLIGHT", "0", "gateway: most jobs one tenant may have queued or running (0: no limit)"},
	{"tenant_max_tokens", "tenant-max-tokens", "MLX_SERVING_TENANT_MAX_TOKENS", "0", "gateway: largest max_tokens one request may ask for, and the default (0: no limit)"},
	{"tenant_max_prompt_chars", "tenant-max-prompt-chars", "MLX_SERVING_TENANT_MAX_PROMPT_CHARS", "0", "gateway: longest prompt (all messages) in characters (0: no limit)"},
	{"tenant_rate", "tenant-rate", "MLX_SERVING_TENANT_RATE", "0", "gateway: requests per second per tenant (0: no limit)"},
	{"tenant_burst", "tenant-burst", "MLX_SERVING_TENANT_BURST", "0", "gateway: requests a tenant may send at once above its rate (0: the rate)"},
	{"replicas", "replicas", "MLX_SERVING_REPLICAS", "0", "replicas of every stream: 3 in a NATS cluster (0: keep what existing streams have, 1 for new ones)"},
	{"worker_ttl", "worker-ttl", "MLX_SERVING_WORKER_TTL", "10s", "how long a worker stays registered without a heartbeat; dispatchers retry its jobs after that"},
	{"dispatcher_drain_timeout", "dispatcher-drain-timeout", "MLX_SERVING_DISPATCHER_DRAIN_TIMEOUT", "30s", "dispatcher: on stop, how long it keeps its jobs running on workers alive so their results are acked by it; past it they are redelivered and recognised elsewhere"},
	{"gateway_request_timeout", "gateway-request-timeout", "MLX_SERVING_GATEWAY_REQUEST_TIMEOUT", "10m", "gateway: how long a request may take, arrival to last byte; it is also its job's deadline, so the fleet stops work nobody waits for, and a worker that holds the job past it (plus the dispatcher's 10 s grace) loses it"},
	{"gateway_write_timeout", "gateway-write-timeout", "MLX_SERVING_GATEWAY_WRITE_TIMEOUT", "30s", "gateway: how long one write to a client (a streamed event, a whole answer) may wait for the client to take it; a client that stops reading is dropped after it and its jobs are cancelled, instead of holding the request and its buffered events for as long as it keeps the connection open"},
	{"gateway_max_conns", "gateway-max-conns", "MLX_SERVING_GATEWAY_MAX_CONNS", "0", "gateway: most client connections held at once; past it a new one takes the place of the one quiet longest (idle, or silent since it opened), else of the one longest in a request outside the tenants' generation requests (health, metrics, models, refusals), else of the one blocked longest (past 1 s without progress) writing to a client that reads nothing, and is refused while every one is in a generation request, so connections never take the descriptors NATS and its store need in up (0: a quarter of the process's open-file limit; -1: no bound)"},
	{"attempt_timeout", "attempt-timeout", "MLX_SERVING_ATTEMPT_TIMEOUT", "1h", "dispatcher: how long one attempt may run on a worker; past it the worker is told to stop it and the job is retried elsewhere (so a worker that takes jobs and never ends them holds none for ever); set it above the longest generation your workers may honestly take"},
	{"dispatcher_write_grace", "dispatcher-write-grace", "MLX_SERVING_DISPATCHER_WRITE_GRACE", "10s", "dispatcher: on stop, after the drain, how long terminal records already being written get to be stored and acked; past it their jobs are handed back and may run again"},
	{"metrics_addr", "metrics-addr", "MLX_SERVING_METRICS_ADDR", "", "serve Prometheus /metrics on this host:port (every server; set, the gateway and up serve it here and not on http_addr; empty: the gateway and up serve it on http_addr, the others not at all)"},
	{"otlp_endpoint", "otlp-endpoint", "MLX_SERVING_OTLP_ENDPOINT", "", "export trace spans over OTLP/HTTP to this collector base URL, e.g. http://127.0.0.1:4318 (empty: tracing off)"},
	{"log_level", "log-level", "MLX_SERVING_LOG_LEVEL", "info", "log level"},
	{"log_format", "log-format", "MLX_SERVING_LOG_FORMAT", "json", "log format: json or console"},
}

// RegisterFlags adds a flag for every key to fs. Flag values are read back by Load
// only when the flag was set on the command line, so defaults never hide env or file.
func RegisterFlags(fs *flag.FlagSet) {
	for _, k := range Keys {
		fs.String(k.Flag, k.Default, k.Usage+" (env "+k.Env+")")
	}
	fs.String("config", os.Getenv("MLX_SERVING_CONFIG"), "YAML config file (env MLX_SERVING_CONFIG)")
}

// Load builds the effective configuration from defaults, the YAML file named by
// --config (if any), the environment and the flags set on fs, then validates it.
func Load(fs *flag.FlagSet, environ []string) (Config, error) {
	values := map[string]any{}
	for _, k := range Keys {
		values[k.Name] = k.Default
	}
	path := ""
	if f := fs.Lookup("config"); f != nil {
		path = f.Value.String()
	}
	if path != "" {
		raw, err := os.ReadFile(path)
		if err != nil {
			return Config{}, fmt.Errorf("config: read %s: %w", path, err)
		}
		var file map[string]any
		if err := yaml.Unmarshal(raw, &file); err != nil {
			return Config{}, fmt.Errorf("%w: %s: not YAML: %v", ErrInvalid, path, err)
		}
		for k, v := range file {
			values[k] = v // unknown keys are left for the schema to report
		}
	}
	env := map[string]string{}
	for _, kv := range environ {
		if i := strings.IndexByte(kv, '='); i > 0 {
			env[kv[:i]] = kv[i+1:]
		}
	}
	set := map[string]string{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = f.Value.String() })
	for _, k := range Keys {
		if v, ok := env[k.Env]; ok {
			values[k.Name] = v
		}
		if v, ok := set[k.Flag]; ok {
			values[k.Name] = v
		}
	}
	return fromValues(values)
}

// fromValues coerces strings from env and flags to the schema's types, validates,
// and decodes into Config.
func fromValues(values map[string]any) (Config, error) {
	props := schemaProperties()
	for name, v := range values {
		s, isString := v.(string)
		if !isString {
			continue
		}
		switch props[name] {
		case "integer":
			if n, err := strconv.ParseInt(s, 10, 64); err == nil {
				values[name] = n
			}
		case "boolean":
			if b, err := strconv.ParseBool(s); err == nil {
				values[name] = b
			}
		case "number":
			if f, err := strconv.ParseFloat(s, 64); err == nil {
				values[name] = f
			}
		}
	}
	doc, err := json.Marshal(values)
	if err != nil {
		return Config{}, err
	}
	res, err := compiled().Validate(gojsonschema.NewBytesLoader(doc))
	if err != nil {
		return Config{}, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if !res.Valid() {
		var msgs []string
		for _, e := range res.Errors() {
			field := e.Field()
			if p, ok := e.Details()["property"].(string); ok && e.Type() == "additional_property_not_allowed" {
				field = p
			}
			msgs = append(msgs, fmt.Sprintf("%s: %s", field, e.Description()))
		}
		sort.Strings(msgs)
		return Config{}, fmt.Errorf("%w: %s", ErrInvalid, strings.Join(msgs, "; "))
	}
	var c Config
	if err := json.Unmarshal(doc, &c); err != nil {
		return Config{}, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if _, err := time.ParseDuration(c.BatchMaxWait); err != nil {
		return Config{}, fmt.Errorf("%w: batch_max_wait: %v", ErrInvalid, err)
	}
	if d, err := time.ParseDuration(c.WorkerTTL); err != nil || d < time.Second {
		return Config{}, fmt.Errorf("%w: worker_ttl: must be a duration of at least 1s", ErrInvalid)
	}
	// Zero would not mean "no wait": the dispatcher takes its default for it.
	for _, kv := range [][2]string{{"dispatcher_drain_timeout", c.DispatcherDrainTimeout}, {"dispatcher_write_grace", c.DispatcherWriteGrace},
		{"gateway_request_timeout", c.GatewayRequestTimeout}, {"gateway_write_timeout", c.GatewayWriteTimeout}, {"attempt_timeout", c.AttemptTimeout}} {
		if d, err := time.ParseDuration(kv[1]); err != nil || d <= 0 {
			return Config{}, fmt.Errorf("%w: %s: must be a positive duration", ErrInvalid, kv[0])
		}
	}
	if err := c.checkTokens(); err != nil {
		return Config{}, err
	}
	return c, nil
}

// checkTokens refuses a bearer token listed twice in auth_tokens. Taken as it
// came, the last entry won: "t1=alpha,t1=beta" made alpha's client tenant beta,
// with beta's jobs, limits and prompt cache (operator red team, round 11) —
// a copy-paste slip when adding a tenant, and no warning.
func (c Config) checkTokens() error {
	seen := map[string]bool{}
	for _, t := range strings.Split(c.AuthTokens, ",") {
		token, _, _ := strings.Cut(strings.TrimSpace(t), "=")
		if token = strings.TrimSpace(token); token == "" {
			continue
		}
		if seen[token] {
			return fmt.Errorf("%w: auth_tokens: a token is listed twice (each token must name one tenant)", ErrInvalid)
		}
		seen[token] = true
	}
	return nil
}

// The durations, validated by Load (so parsing them again cannot fail).

// BatchWait returns batch_max_wait.
func (c Config) BatchWait() time.Duration { return duration(c.BatchMaxWait) }

// WorkerTTLDuration returns worker_ttl.
func (c Config) WorkerTTLDuration() time.Duration { return duration(c.WorkerTTL) }

// DrainTimeout returns dispatcher_drain_timeout.
func (c Config) DrainTimeout() time.Duration { return duration(c.DispatcherDrainTimeout) }

// WriteGrace returns dispatcher_write_grace.
func (c Config) WriteGrace() time.Duration { return duration(c.DispatcherWriteGrace) }

// AttemptTimeoutDuration returns attempt_timeout.
func (c Config) AttemptTimeoutDuration() time.Duration { return duration(c.AttemptTimeout) }

// RequestTimeout returns gateway_request_timeout.
func (c Config) RequestTimeout() time.Duration { return duration(c.GatewayRequestTimeout) }

// WriteTimeout returns gateway_write_timeout.
func (c Config) WriteTimeout() time.Duration { return duration(c.GatewayWriteTimeout) }

func duration(s string) time.Duration {
	d, _ := time.ParseDuration(s)
	return d
}

// URLs splits nats_url.
func (c Config) URLs() []string {
	var out []string
	for _, u := range strings.Split(c.NATSURL, ",") {
		if u = strings.TrimSpace(u); u != "" {
			out = append(out, u)
		}
	}
	return out
}

// Tokens are the entries of auth_tokens that name no tenant (tenant "default").
func (c Config) Tokens() []string {
	var out []string
	for _, t := range strings.Split(c.AuthTokens, ",") {
		if t = strings.TrimSpace(t); t != "" && !strings.Contains(t, "=") {
			out = append(out, t)
		}
	}
	return out
}

// TokenTenants maps the tokens of auth_tokens entries written token=tenant to
// their tenant.
func (c Config) TokenTenants() map[string]string {
	out := map[string]string{}
	for _, t := range strings.Split(c.AuthTokens, ",") {
		token, tenant, ok := strings.Cut(strings.TrimSpace(t), "=")
		if token, tenant = strings.TrimSpace(token), strings.TrimSpace(tenant); ok && token != "" && tenant != "" {
			out[token] = tenant
		}
	}
	return out
}

// CORSOriginList splits cors_origins.
func (c Config) CORSOriginList() []string {
	var out []string
	for _, o := range strings.Split(c.CORSOrigins, ",") {
		if o = strings.TrimSpace(o); o != "" {
			out = append(out, o)
		}
	}
	return out
}

// YAML renders the configuration as a config file would hold it, secrets masked.
func (c Config) YAML() ([]byte, error) {
	if c.NATSPassword != "" {
		c.NATSPassword = "********"
	}
	if c.AuthTokens != "" {
		c.AuthTokens = "********"
	}
	return yaml.Marshal(c)
}

var compiled = sync.OnceValue(func() *gojsonschema.Schema {
	s, err := gojsonschema.NewSchema(gojsonschema.NewBytesLoader(schemaJSON))
	if err != nil {
		panic("config: embedded schema does not compile: " + err.Error())
	}
	return s
})

func schemaProperties() map[string]string {
	var s struct {
		Properties map[string]struct {
			Type string `json:"type"`
		} `json:"properties"`
	}
	_ = json.Unmarshal(schemaJSON, &s)
	out := map[string]string{}
	for k, v := range s.Properties {
		out[k] = v.Type
	}
	return out
}
