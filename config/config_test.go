package config

import (
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func load(t *testing.T, args []string, env []string) (Config, error) {
	t.Helper()
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	return Load(fs, env)
}

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefaults(t *testing.T) {
	t.Parallel()
	c, err := load(t, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.HTTPAddr != "127.0.0.1:8080" || c.NATSListen != "127.0.0.1:4222" || c.Slots != 8 || !c.SyncAlways || c.MaxAttempts != 3 {
		t.Fatalf("defaults: %+v", c)
	}
}

func TestPrecedenceFlagOverEnvOverFile(t *testing.T) {
	t.Parallel()
	path := writeFile(t, "http_addr: 127.0.0.1:1111\nslots: 2\nmodel: from-file\n")
	env := []string{"MLX_SERVING_HTTP_ADDR=127.0.0.1:2222", "MLX_SERVING_SLOTS=3"}
	c, err := load(t, []string{"--config", path, "--http-addr", "127.0.0.1:3333"}, env)
	if err != nil {
		t.Fatal(err)
	}
	if c.HTTPAddr != "127.0.0.1:3333" {
		t.Errorf("flag should win: %s", c.HTTPAddr)
	}
	if c.Slots != 3 {
		t.Errorf("env should beat file: %d", c.Slots)
	}
	if c.Model != "from-file" {
		t.Errorf("file should beat default: %q", c.Model)
	}
}

func TestInvalidValuesNameTheKey(t *testing.T) {
	t.Parallel()
	cases := map[string]struct {
		file string
		env  []string
		want string
	}{
		"unknown key":     {file: "slotz: 3\n", want: "slotz"},
		"out of range":    {env: []string{"MLX_SERVING_SLOTS=0"}, want: "slots"},
		"not a number":    {env: []string{"MLX_SERVING_SLOTS=many"}, want: "slots"},
		"bad enum":        {file: "log_level: loud\n", want: "log_level"},
		"bad duration":    {file: "batch_max_wait: soon\n", want: "batch_max_wait"},
		"bad url":         {file: "nats_url: http://x\n", want: "nats_url"},
		"bad cors origin": {env: []string{"MLX_SERVING_CORS_ORIGINS=https://a.example,app.example"}, want: "cors_origins"},
		"not yaml at all": {file: "a: [b\n", want: "not YAML"},
		"bad routing":     {env: []string{"MLX_SERVING_ROUTING=random"}, want: "routing"},
		"zero skew":       {env: []string{"MLX_SERVING_ROUTE_MAX_SKEW=0"}, want: "route_max_skew"},
		"skew not number": {env: []string{"MLX_SERVING_ROUTE_MAX_SKEW=half"}, want: "route_max_skew"},
		"zero drain":      {env: []string{"MLX_SERVING_DISPATCHER_DRAIN_TIMEOUT=0s"}, want: "dispatcher_drain_timeout"},
		"grace no unit":   {file: "dispatcher_write_grace: 10\n", want: "dispatcher_write_grace"},
		// A store below the streams' own reservations cannot hold them.
		"tiny store": {env: []string{"MLX_SERVING_JETSTREAM_MAX_STORE=1000"}, want: "jetstream_max_store"},
		// Mutation caught (both): checkTokens not called from Load.
		"token twice":       {env: []string{"MLX_SERVING_AUTH_TOKENS=t1=alpha,t2=gamma,t1=beta"}, want: "auth_tokens"},
		"plain token twice": {env: []string{"MLX_SERVING_AUTH_TOKENS=t1, t1=beta"}, want: "auth_tokens"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			var args []string
			if tc.file != "" {
				args = []string{"--config", writeFile(t, tc.file)}
			}
			_, err := load(t, args, tc.env)
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("want ErrInvalid, got %v", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not name %q", err, tc.want)
			}
		})
	}
}

// TestRoutingKeys: routing and route_max_skew reach Config from their
// defaults, the environment and flags (a number key is parsed from text).
// Mutation caught: the "number" case of fromValues removed (the env value
// stays a string and fails the schema).
func TestRoutingKeys(t *testing.T) {
	t.Parallel()
	c, err := load(t, nil, nil)
	if err != nil || c.Routing != "prefix" || c.RouteMaxSkew != 0.5 {
		t.Fatalf("defaults: %q %v %v", c.Routing, c.RouteMaxSkew, err)
	}
	c, err = load(t, []string{"--routing", "least_loaded"}, []string{"MLX_SERVING_ROUTE_MAX_SKEW=0.25"})
	if err != nil || c.Routing != "least_loaded" || c.RouteMaxSkew != 0.25 {
		t.Fatalf("set: %q %v %v", c.Routing, c.RouteMaxSkew, err)
	}
}

// TestDispatcherStopKeys: dispatcher_drain_timeout and dispatcher_write_grace
// default to what the dispatcher does unset (its AckWait, 30s, and 10s) and
// reach Config from a file, the environment and flags.
// Mutation caught: WriteGrace parsing DispatcherDrainTimeout (a copy-paste slip
// between the two accessors).
func TestDispatcherStopKeys(t *testing.T) {
	t.Parallel()
	c, err := load(t, nil, nil)
	if err != nil || c.DrainTimeout() != 30*time.Second || c.WriteGrace() != 10*time.Second {
		t.Fatalf("defaults: %v %v %v", c.DrainTimeout(), c.WriteGrace(), err)
	}
	path := writeFile(t, "dispatcher_drain_timeout: 2m\ndispatcher_write_grace: 4s\n")
	c, err = load(t, []string{"--config", path, "--dispatcher-write-grace", "1500ms"}, []string{"MLX_SERVING_DISPATCHER_DRAIN_TIMEOUT=45s"})
	if err != nil || c.DrainTimeout() != 45*time.Second || c.WriteGrace() != 1500*time.Millisecond {
		t.Fatalf("set: %v %v %v", c.DrainTimeout(), c.WriteGrace(), err)
	}
	c, err = load(t, []string{"--config", path}, nil)
	if err != nil || c.DrainTimeout() != 2*time.Minute || c.WriteGrace() != 4*time.Second {
		t.Fatalf("file: %v %v %v", c.DrainTimeout(), c.WriteGrace(), err)
	}
}

// TestGatewayRequestTimeout: gateway_request_timeout defaults to the
// gateway's own 10 minutes, reaches Config from a flag, and must be a
// positive duration. Mutation caught: RequestTimeout parsing another key.
func TestGatewayRequestTimeout(t *testing.T) {
	t.Parallel()
	c, err := load(t, nil, nil)
	if err != nil || c.RequestTimeout() != 10*time.Minute {
		t.Fatalf("default: %v %v", c.RequestTimeout(), err)
	}
	c, err = load(t, []string{"--gateway-request-timeout", "90s"}, nil)
	if err != nil || c.RequestTimeout() != 90*time.Second {
		t.Fatalf("flag: %v %v", c.RequestTimeout(), err)
	}
	if _, err := load(t, []string{"--gateway-request-timeout", "0s"}, nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("0s accepted: %v", err)
	}
}

// TestGatewayWriteTimeout: gateway_write_timeout defaults to the gateway's
// own 30 s, reaches Config from the environment, and must be a positive
// duration. Mutation caught: WriteTimeout parsing another key.
func TestGatewayWriteTimeout(t *testing.T) {
	t.Parallel()
	c, err := load(t, nil, nil)
	if err != nil || c.WriteTimeout() != 30*time.Second {
		t.Fatalf("default: %v %v", c.WriteTimeout(), err)
	}
	c, err = load(t, nil, []string{"MLX_SERVING_GATEWAY_WRITE_TIMEOUT=5s"})
	if err != nil || c.WriteTimeout() != 5*time.Second {
		t.Fatalf("env: %v %v", c.WriteTimeout(), err)
	}
	if _, err := load(t, []string{"--gateway-write-timeout", "0s"}, nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("0s accepted: %v", err)
	}
}

// Mutation caught: CORSOriginList returning nil gives the gateway no origins.
func TestCORSOrigins(t *testing.T) {
	t.Parallel()
	c, err := load(t, []string{"--cors-origins", " https://app.example.com , http://localhost:3000,*"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(c.CORSOriginList(), " "); got != "https://app.example.com http://localhost:3000 *" {
		t.Fatalf("origins %q", got)
	}
	if c, err := load(t, nil, nil); err != nil || c.CORSOriginList() != nil {
		t.Fatalf("default origins %v, %v", c.CORSOriginList(), err)
	}
}

func TestYAMLMasksSecrets(t *testing.T) {
	t.Parallel()
	c, err := load(t, []string{"--auth-tokens", "s3cret,other", "--nats-password", "pw"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Tokens(); len(got) != 2 || got[0] != "s3cret" {
		t.Fatalf("tokens: %v", got)
	}
	out, err := c.YAML()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), "s3cret") || strings.Contains(string(out), "pw\n") {
		t.Fatalf("secrets printed:\n%s", out)
	}
	if !strings.Contains(string(out), "http_addr: 127.0.0.1:8080") {
		t.Fatalf("missing key:\n%s", out)
	}
}
