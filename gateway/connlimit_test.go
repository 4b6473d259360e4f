package gateway

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

// runListening runs a gateway on a real listener holding at most maxConns
// client connections (0: the default), its config changed by mutate if not
// nil; stop ends Run and returns its error.
func runListening(t *testing.T, maxConns int, mutate func(*Config)) (g *Gateway, stop func() error) {
	t.Helper()
	tb := startBus(t, jsprov.Options{})
	cfg := testConfig(t, tb.nc)
	cfg.Addr, cfg.MaxConns = "127.0.0.1:0", maxConns
	if mutate != nil {
		mutate(&cfg)
	}
	g, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g.Run(ctx) }()
	var once sync.Once
	var runErr error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-done:
			case <-time.After(10 * time.Second):
				runErr = errors.New("Run did not return after ctx was cancelled")
			}
		})
		return runErr
	}
	t.Cleanup(func() { _ = stop() })
	return g, stop
}

// dial opens a raw connection to g that may send, or may say nothing.
func dial(t *testing.T, g *Gateway, send string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", g.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if send != "" {
		if _, err := c.Write([]byte(send)); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// closedByServer reports whether the server closed c: a read ends at once
// instead of waiting past a short deadline.
func closedByServer(c net.Conn) bool {
	_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	_, err := c.Read(make([]byte, 1))
	return err != nil && !errors.Is(err, os.ErrDeadlineExceeded)
}

// Connections past the bound take the places of the quietest: ten silent
// connections and a request, with room for four, leave the request answered
// and seven silent ones closed. Red team round 22: connections that never
// authenticate took every descriptor of `up`, and JetStream's store broke.
// Mutation caught: Listen without the limiter: none closed: red.
func TestConnectionsPastTheBoundCloseTheQuietest(t *testing.T) {
	t.Parallel()
	g, _ := runListening(t, 4, nil)
	var silent []net.Conn
	for range 10 {
		silent = append(silent, dial(t, g, ""))
	}
	r, err := http.Get("http://" + g.Addr().String() + "/healthz")
	if err != nil {
		t.Fatalf("a request past ten silent connections: %v", err)
	}
	_ = r.Body.Close()
	if r.StatusCode != http.StatusOK {
		t.Fatalf("healthz %d", r.StatusCode)
	}
	closed := 0
	for _, c := range silent {
		if closedByServer(c) {
			closed++
		}
	}
	if closed < 7 {
		t.Fatalf("%d of 10 silent connections closed; want at least 7 (room for 4, one request)", closed)
	}
}

// A connection inside a request is never closed for a newcomer: at the bound
// with every connection busy (reading a body that has not come), the newcomer
// is refused and the requests go on.
// Mutation caught: track leaving active connections closable: they never
// leave the closable set (the wait for both requests times out): red.
// Mutation caught: serve without countConn: the busy requests are closed for
// the newcomer: red.
func TestBusyConnectionsAreNotClosedForNewcomers(t *testing.T) {
	t.Parallel()
	// Two tenants: one tenant reads at most a quarter of the bound's bodies
	// (at least one).
	g, _ := runListening(t, 2, func(c *Config) { c.TokenTenants = map[string]string{"ta": "a", "tb": "b"} })
	post := func(token string) string {
		return "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token +
			"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
	}
	busy := []net.Conn{dial(t, g, post("ta")), dial(t, g, post("tb"))}
	lim := g.ln.(*connLimiter)
	testenv.WaitFor(t, 10*time.Second, "both requests in progress", func() bool {
		lim.mu.Lock()
		defer lim.mu.Unlock()
		return len(lim.open) == 2 && len(lim.quiet) == 0
	})
	client := &http.Client{Timeout: 5 * time.Second}
	if r, err := client.Get("http://" + g.Addr().String() + "/healthz"); err == nil {
		_ = r.Body.Close()
		t.Fatalf("a newcomer was answered %d with every connection busy", r.StatusCode)
	}
	for i, c := range busy {
		if closedByServer(c) {
			t.Fatalf("busy connection %d was closed for a newcomer", i)
		}
	}
}

// A refusal written before its body was read closes the connection: a client
// that sends headers without a token and then its body a byte at a time gets
// its 401 at once and its connection back, instead of net/http waiting
// without a deadline for the rest of the body while the connection counts as
// busy (round 22's second pass: twenty such kept everyone out of a gateway
// bounded at twenty). A body read to its end keeps the connection.
// Mutation caught: routes without closeUnread: no answer within 5 s: red.
func TestRefusalBeforeTheBodyClosesTheConnection(t *testing.T) {
	t.Parallel()
	g, _ := runListening(t, 0, func(c *Config) { c.Tokens = []string{"tok"} })
	c := dial(t, g, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	answer, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("no answer and no close within 5 s: %v (read %q)", err, answer)
	}
	if !strings.HasPrefix(string(answer), "HTTP/1.1 401") || !strings.Contains(string(answer), "Connection: close") {
		t.Fatalf("answer %q, want a 401 that closes", answer)
	}
}

// Where the gateway serves several tenants, one has at most a quarter of the
// connection bound's connections inside requests at once: past that its next
// request is refused 429 before its body is read, while another tenant's is
// served. Each such request holds a connection the bound never closes, and
// one tenant's slow bodies (or jobs left waiting in the queue) closed every
// other tenant's connections (red team round 23).
// Mutation caught: serve without tenantConns.enter: the third slow body waits
// for its bytes instead of an answer: red.
func TestOneTenantHoldsAQuarterOfTheConnections(t *testing.T) {
	t.Parallel()
	g, _ := runListening(t, 8, func(c *Config) {
		c.Tokens = []string{"tok"}
		c.TokenTenants = map[string]string{"tokb": "b"}
	})
	slow := func(token string) net.Conn {
		return dial(t, g, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "+token+
			"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
	}
	slow("tok")
	slow("tok") // two: a quarter of 8
	testenv.WaitFor(t, 10*time.Second, "two requests in", func() bool {
		g.conns.mu.Lock()
		defer g.conns.mu.Unlock()
		return g.conns.n[DefaultTenant] == 2
	})
	third := slow("tok")
	_ = third.SetReadDeadline(time.Now().Add(10 * time.Second))
	answer, err := io.ReadAll(third)
	if err != nil || !strings.HasPrefix(string(answer), "HTTP/1.1 429") || !strings.Contains(string(answer), codeTenantConns) {
		t.Fatalf("a third request of one tenant: %q, %v; want 429 %s before its body is read", answer, err, codeTenantConns)
	}
	other := dial(t, g, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tokb\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
	_ = other.SetReadDeadline(time.Now().Add(10 * time.Second))
	answer, err = io.ReadAll(other)
	if err != nil || !strings.HasPrefix(string(answer), "HTTP/1.1 400") {
		t.Fatalf("another tenant's request: %q, %v; want it read (400 for the empty job)", answer, err)
	}
}

// A gateway of one tenant keeps no connections from it: there is nobody to
// keep them for; nor does a Handler mounted elsewhere (no Listen), which has
// no connection bound to keep a tenant within (round 23's last check, L1).
// Mutation caught: the share set in New: the unlistened gateway has one.
func TestConnectionShareOnlyWithTenantsAndTheBound(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name   string
		tokens []string
		named  map[string]string
		listen bool
		share  bool
	}{
		{"no tokens", nil, nil, true, false},
		{"tokens of one tenant", []string{"t1", "t2"}, map[string]string{"t3": DefaultTenant}, true, false},
		{"two tenants", []string{"t1"}, map[string]string{"t2": "b"}, true, true},
		{"two tenants, mounted elsewhere", []string{"t1"}, map[string]string{"t2": "b"}, false, false},
	} {
		tb := startBus(t, jsprov.Options{})
		cfg := testConfig(t, tb.nc)
		cfg.Addr, cfg.MaxConns, cfg.Tokens, cfg.TokenTenants = "127.0.0.1:0", 8, c.tokens, c.named
		g, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if c.listen {
			if err := g.Listen(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = g.ln.Close() })
		}
		if got := g.conns.shareNow() > 0; got != c.share {
			t.Errorf("%s: share %d, want one: %v", c.name, g.conns.shareNow(), c.share)
		}
	}
}

// Connections pipelining keep-alive requests and never reading the answers
// are closed for a newcomer when none is quiet: they held the server blocked
// writing, "in a request", for the 30 s write timeout, and eight of them kept
// everyone out of a bound of eight, no token needed (round 23's last check).
// Mutation caught: victim without its uncounted and stuck rules: the
// newcomer is refused: red.
func TestAConnectionStuckWritingIsClosedForANewcomer(t *testing.T) {
	t.Parallel()
	g, _ := runListening(t, 2, nil)
	lim := g.ln.(*connLimiter)
	for range 2 {
		c := dial(t, g, "")
		_ = c.(*net.TCPConn).SetReadBuffer(4096)
		go func() { // pipelines until the server stops reading; ends when c closes
			req := []byte(strings.Repeat("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 256))
			for {
				if _, err := c.Write(req); err != nil {
					return
				}
			}
		}()
	}
	testenv.WaitFor(t, 30*time.Second, "both connections stuck writing", func() bool {
		lim.mu.Lock()
		defer lim.mu.Unlock()
		stuck := 0
		for c := range lim.open {
			if w := c.writing.Load(); w != 0 && time.Since(time.Unix(0, w)) >= stuckWrite {
				stuck++
			}
		}
		return stuck == 2 && len(lim.quiet) == 0
	})
	client := &http.Client{Timeout: 5 * time.Second}
	r, err := client.Get("http://" + g.Addr().String() + "/healthz")
	if err != nil {
		t.Fatalf("a newcomer with both connections stuck writing: %v", err)
	}
	_ = r.Body.Close()
	if r.StatusCode != http.StatusOK {
		t.Fatalf("healthz %d", r.StatusCode)
	}
}

// A request no tenant share counts — /metrics here, its handler still
// running — is closed for a newcomer when none is quiet: eight connections
// pipelining GET /metrics and reading the answers a little at a time, each
// write under a second, kept tenant b out of a bound of eight for as long as
// they liked (round 24).
// Mutation caught: victim without its uncounted rule: the newcomer is refused: red.
func TestAnUncountedRequestIsClosedForANewcomer(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	entered := make(chan struct{}, 2)
	g, _ := runListening(t, 2, func(c *Config) {
		c.Metrics = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			entered <- struct{}{}
			select {
			case <-release:
			case <-r.Context().Done():
			}
		})
	})
	held := []net.Conn{
		dial(t, g, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
		dial(t, g, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
	}
	<-entered
	<-entered
	client := &http.Client{Timeout: 5 * time.Second}
	r, err := client.Get("http://" + g.Addr().String() + "/healthz")
	if err != nil {
		t.Fatalf("a newcomer with both connections inside /metrics: %v", err)
	}
	_ = r.Body.Close()
	if r.StatusCode != http.StatusOK {
		t.Fatalf("healthz %d", r.StatusCode)
	}
	closed := 0
	for _, c := range held {
		if closedByServer(c) {
			closed++
		}
	}
	if closed != 1 {
		t.Fatalf("%d of the 2 /metrics connections closed for one newcomer; want 1", closed)
	}
}

// The order in which a newcomer at the bound takes a connection's place:
// quiet longest, else uncounted request longest, else stuck writing longest;
// a tenant's counted request that is writing (or not) within stuckWrite is
// never taken.
// Mutations caught: each rule removed, or counted connections treated as
// uncounted: a row goes red.
func TestTheNewcomerTakesTheQuietThenTheUncountedThenTheStuck(t *testing.T) {
	t.Parallel()
	now := time.Now()
	type conn struct {
		quiet   time.Duration // >0: quiet for this long
		active  time.Duration // in its request for this long
		counted bool
		writing time.Duration // >0: blocked writing for this long
	}
	for _, tc := range []struct {
		name  string
		conns []conn
		want  int // index of the victim; -1: refused
		why   closeReason
	}{
		{"quiet longest first", []conn{{quiet: time.Second}, {active: time.Hour}, {quiet: 2 * time.Second}}, 2, closedQuiet},
		{"then the oldest uncounted request", []conn{{active: time.Second}, {active: time.Hour, counted: true, writing: time.Hour}, {active: time.Minute}}, 2, closedUncounted},
		{"then the longest stuck", []conn{{active: time.Hour, counted: true, writing: 2 * time.Second}, {active: time.Second, counted: true, writing: 5 * time.Second}}, 1, closedStuck},
		{"a counted write under stuckWrite is kept", []conn{{active: time.Hour, counted: true, writing: stuckWrite / 2}, {active: time.Hour, counted: true}}, -1, closedStuck},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newConnLimiter(nil, len(tc.conns), nil)
			var cs []*limitedConn
			for _, c := range tc.conns {
				lc := &limitedConn{l: l, active: now.Add(-c.active), counted: c.counted}
				if c.writing > 0 {
					lc.writing.Store(now.Add(-c.writing).UnixNano())
				}
				l.open[lc] = struct{}{}
				if c.quiet > 0 {
					l.quiet[lc] = now.Add(-c.quiet)
				}
				cs = append(cs, lc)
			}
			got, why := l.victim(now)
			if tc.want < 0 {
				if got != nil {
					t.Fatalf("a victim was chosen (%v); want none", why)
				}
				return
			}
			if got != cs[tc.want] || why != tc.why {
				idx := -1
				for i, c := range cs {
					if c == got {
						idx = i
					}
				}
				t.Fatalf("victim %d (%v); want %d (%v)", idx, why, tc.want, tc.why)
			}
		})
	}
}

// pieceConn records the writes it is given and whether each was stamped.
type pieceConn struct {
	net.Conn
	lc      *limitedConn
	pieces  []int
	stamped []bool
}

func (c *pieceConn) Write(p []byte) (int, error) {
	c.pieces = append(c.pieces, len(p))
	c.stamped = append(c.stamped, c.lc.writing.Load() != 0)
	return len(p), nil
}

// A large answer goes to the socket writeChunk at a time, each piece stamped:
// a reader taking a 5 MB answer slowly but steadily shows progress, and is
// not "stuck" after a second (round 24: one 5 MB Write was cut at 4 MB).
// Mutation caught: Write passing p whole: one 5 MB piece: red.
func TestWritesGoOutInPieces(t *testing.T) {
	t.Parallel()
	l := newConnLimiter(nil, 1, nil)
	pc := &pieceConn{}
	lc := &limitedConn{l: l, Conn: pc}
	pc.lc = lc
	n, err := lc.Write(make([]byte, 5<<20))
	if err != nil || n != 5<<20 {
		t.Fatalf("wrote %d, %v", n, err)
	}
	if len(pc.pieces) != (5<<20)/writeChunk {
		t.Fatalf("%d pieces %v; want %d of %d bytes", len(pc.pieces), pc.pieces, (5<<20)/writeChunk, writeChunk)
	}
	for i, p := range pc.pieces {
		if p > writeChunk || !pc.stamped[i] {
			t.Fatalf("piece %d: %d bytes, stamped %v", i, p, pc.stamped[i])
		}
	}
	if lc.writing.Load() != 0 {
		t.Fatal("the write ended but the connection still counts as writing")
	}
}
