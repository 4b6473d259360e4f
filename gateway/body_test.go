package gateway

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
)

// These tests speak HTTP/1.1 on a raw connection to a real server, so they
// control exactly how much of a body is sent and when. Each request says
// "Expect: 100-continue": net/http sends "100 Continue" when the handler first
// reads the body, so an answer that comes without one proves the body was never
// read, and a 100 proves the handler got past everything before reading it.

// bodyGateway serves a gateway with tokens "tok-a" (tenant a) and "tok-b"
// (tenant b) and returns its host:port.
func bodyGateway(t *testing.T, mutate func(*Config)) (*Gateway, string) {
	t.Helper()
	tb := startBus(t, jsprov.Options{})
	tb.registerWorker(t, "w1", "ready", testModel)
	g, srv := newTestGateway(t, tb, func(c *Config) {
		c.TokenTenants = map[string]string{"tok-a": "a", "tok-b": "b"}
		if mutate != nil {
			mutate(c)
		}
	})
	return g, srv.Listener.Addr().String()
}

// rawConn is one client connection with a request's head sent.
type rawConn struct {
	t  *testing.T
	c  net.Conn
	br *bufio.Reader
}

// startPost sends the head of a POST /v1/completions whose body will be length
// bytes (negative: chunked; token "" sends no Authorization), and no byte of
// the body.
func startPost(t *testing.T, addr, token string, length int64) *rawConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	// A guard, not an assertion: a broken gateway fails the read instead of
	// hanging the test.
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	framing := fmt.Sprintf("Content-Length: %d", length)
	if length < 0 {
		framing = "Transfer-Encoding: chunked"
	}
	head := "POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n" + framing + "\r\nExpect: 100-continue\r\n"
	if token != "" {
		head += "Authorization: Bearer " + token + "\r\n"
	}
	if _, err := c.Write([]byte(head + "\r\n")); err != nil {
		t.Fatal(err)
	}
	return &rawConn{t: t, c: c, br: bufio.NewReader(c)}
}

// answer reads the next response on the connection (a 100 Continue included).
func (rc *rawConn) answer() *http.Response {
	rc.t.Helper()
	resp, err := http.ReadResponse(rc.br, nil)
	if err != nil {
		rc.t.Fatalf("reading the answer: %v", err)
	}
	rc.t.Cleanup(func() { _ = resp.Body.Close() })
	return resp
}

// expectContinue: the handler started reading the body.
func (rc *rawConn) expectContinue() {
	rc.t.Helper()
	if resp := rc.answer(); resp.StatusCode != http.StatusContinue {
		rc.t.Fatalf("status %d, want 100 Continue (the handler reading the body)", resp.StatusCode)
	}
}

func (rc *rawConn) send(s string) {
	rc.t.Helper()
	if _, err := rc.c.Write([]byte(s)); err != nil {
		rc.t.Fatal(err)
	}
}

// Mutation caught: reading the body (io.ReadAll(r.Body)) in requireTenant before
// authenticating: the server then sends 100 Continue first.
func TestUnauthenticatedBodyIsRefusedUnread(t *testing.T) {
	t.Parallel()
	_, addr := bodyGateway(t, nil)
	for _, token := range []string{"", "wrong"} {
		rc := startPost(t, addr, token, 8<<20)
		expectError(t, rc.answer(), http.StatusUnauthorized, "", "invalid_api_key")
	}
}

// A compressed body is refused unread with 415 and a stable code, not read
// as malformed JSON.
// Mutation caught: readBody without the Content-Encoding check (400
// invalid JSON).
func TestCompressedBodyIs415(t *testing.T) {
	t.Parallel()
	_, addr := bodyGateway(t, nil)
	req, err := http.NewRequest(http.MethodPost, "http://"+addr+"/v1/completions", strings.NewReader("\x1f\x8b\x08\x00 not json"))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer tok-a")
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Content-Encoding", "gzip")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	expectError(t, resp, http.StatusUnsupportedMediaType, "", codeBodyEncoding)
}

// Mutation caught: dropping the Content-Length check in readBody (the body is
// then read up to the limit: 100 Continue comes first); MaxBytesReader's limit
// raised to limit+1<<20 (a chunked body past the limit is read in full and the
// answer is 400, not 413).
func TestOversizedBodyIs413(t *testing.T) {
	t.Parallel()
	g, addr := bodyGateway(t, func(c *Config) { c.MaxBodyBytes = 1000 })
	rc := startPost(t, addr, "tok-a", 1001)
	e := expectError(t, rc.answer(), http.StatusRequestEntityTooLarge, "", codeBodyTooLarge)
	if !strings.Contains(e.Error.Message, "1000 bytes") {
		t.Errorf("message %q does not name the limit", e.Error.Message)
	}

	// A chunked body says no length: it is cut when it passes the limit.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	chunk := strings.Repeat("x", 1200)
	fmt.Fprintf(c, "POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer tok-a\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n", len(chunk), chunk)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	expectError(t, resp, http.StatusRequestEntityTooLarge, "", codeBodyTooLarge)
	if n := value(observed(g).Errors.WithLabelValues(codeBodyTooLarge)); n != 2 {
		t.Errorf("%s answers counted: %v, want 2", codeBodyTooLarge, n)
	}
}

// The budget bounds the bytes held at once: a body whose declared length cannot
// fit beside the bytes another body holds is refused unread; one that fits is
// read; a decoded body's bytes come back. Bytes are charged as they arrive, not
// as declared (TestIdleBodiesHoldNothing), so the held body sends all but its
// last byte, and the test waits until the gateway holds them: the budget then
// bounds what is really in memory, each buffer charged before it is allocated
// (TestBodyBufferIsChargedBeforeItIsAllocated).
// Mutation caught: bodyBudget.refusal never answering bodyBudgetFull (the
// second body is read: 100 Continue instead of 503); bodyHold.release not
// refunding (waitHeld for 0 never returns: the guard fails it).
func TestBodyBytesReadingAtOnceAreBounded(t *testing.T) {
	t.Parallel()
	g, addr := bodyGateway(t, func(c *Config) { c.MaxBodyBytes, c.MaxBodyBytesReading = 1000, 1000 })
	held := startPost(t, addr, "tok-a", 600)
	held.expectContinue()
	held.send(strings.Repeat("x", 599))
	waitHeld(t, g, "a", 600) // a buffer of 512 bytes, grown to 600 by the 513th

	// Another tenant's body does not fit beside it: refused before being read.
	rc := startPost(t, addr, "tok-b", 600)
	resp := rc.answer()
	if resp.Header.Get("Retry-After") == "" {
		t.Error("503 without Retry-After")
	}
	expectError(t, resp, http.StatusServiceUnavailable, "", codeBodyCapacity)
	// A smaller one fits.
	small := startPost(t, addr, "tok-b", 400)
	small.expectContinue()
	small.send(strings.Repeat(" ", 400))
	expectError(t, small.answer(), http.StatusBadRequest, "", "invalid_value")

	// The held body completes (not JSON: 400) and gives its bytes back.
	held.send("x")
	expectError(t, held.answer(), http.StatusBadRequest, "", "invalid_value")
	waitHeld(t, g, "a", 0)
	again := startPost(t, addr, "tok-b", 600)
	again.expectContinue()

	if n := value(observed(g).Errors.WithLabelValues(codeBodyCapacity)); n != 1 {
		t.Errorf("%s answers counted: %v, want 1", codeBodyCapacity, n)
	}
}

// Mutation caught: readBody not setting the read deadline (the answer never
// comes: the guard's deadline fails the read).
func TestSlowBodyIsCutAtItsReadDeadline(t *testing.T) {
	t.Parallel()
	g, addr := bodyGateway(t, func(c *Config) { c.BodyReadTimeout = 100 * time.Millisecond })
	rc := startPost(t, addr, "tok-a", 100)
	rc.expectContinue()
	rc.send(`{"model":`) // and nothing more
	expectError(t, rc.answer(), http.StatusRequestTimeout, "", codeBodyTimeout)
	if n := value(observed(g).Errors.WithLabelValues(codeBodyTimeout)); n != 1 {
		t.Errorf("%s answers counted: %v, want 1", codeBodyTimeout, n)
	}
}

// The body's read deadline ends with the body: an answer streamed for longer is
// not cut. No clock is read: a second request's 408, sent after the stream
// began, proves the stream's own body deadline has passed too.
// Mutation caught: readBody setting the deadline again once the body is in
// (the server's read that watches for a client leaving times out, the request's
// context is cancelled and the stream ends without [DONE]).
func TestStreamOutlivesItsBodyReadDeadline(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	fw := startFakeWorker(t, tb, fakeworker.Plan{Tokens: []string{"a", "b"}, Block: true})
	g, srv := newTestGateway(t, tb, func(c *Config) {
		c.TokenTenants = map[string]string{"tok-a": "a"}
		c.BodyReadTimeout = 100 * time.Millisecond
	})
	resp := postJSON(t, srv.URL+"/v1/chat/completions", chatBody(true, nil), "Authorization", "Bearer tok-a")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	br := bufio.NewReader(resp.Body)
	var got strings.Builder
	for !strings.Contains(got.String(), `"b"`) { // both tokens streamed; the job waits for Release
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("stream ended early: %v (so far %q)", err, got.String())
		}
		got.WriteString(line)
	}
	slow := startPost(t, srv.Listener.Addr().String(), "tok-a", 100)
	slow.expectContinue()
	expectError(t, slow.answer(), http.StatusRequestTimeout, "", codeBodyTimeout)

	fw.Release()
	rest, err := io.ReadAll(br)
	if err != nil {
		t.Fatalf("the stream was cut: %v", err)
	}
	if !strings.HasSuffix(strings.TrimSpace(string(rest)), "data: [DONE]") {
		t.Fatalf("the stream ended without [DONE]: %q", rest)
	}
	if n := value(observed(g).Disconnects); n != 0 {
		t.Errorf("%v client disconnects counted, want 0", n)
	}
}

// Mutation caught: serve not taking the in-flight slot before reading the body
// (the refusal comes only after the body: 100 Continue first).
func TestTenantAtItsInFlightLimitIsRefusedUnread(t *testing.T) {
	t.Parallel()
	g, addr := bodyGateway(t, func(c *Config) { c.Limits = TenantLimits{MaxInFlight: 1} })
	held := startPost(t, addr, "tok-a", 100)
	held.expectContinue() // a's one slot is taken

	rc := startPost(t, addr, "tok-a", 100)
	expectError(t, rc.answer(), http.StatusTooManyRequests, "", codeTenantQueue)
	other := startPost(t, addr, "tok-b", 100)
	other.expectContinue() // b has its own slot
	if n := value(observed(g).TenantRefusals.WithLabelValues("a", codeTenantQueue)); n != 1 {
		t.Errorf("a's %s refusals: %v, want 1", codeTenantQueue, n)
	}
}

// BodyLimitFor leaves room for a body three times its job (escaped non-ASCII).
func TestBodyLimitFor(t *testing.T) {
	if got := BodyLimitFor(1 << 20); got != 3<<20 {
		t.Errorf("BodyLimitFor(1 MiB) = %d", got)
	}
	if got := BodyLimitFor(0); got != DefaultMaxBodyBytes {
		t.Errorf("BodyLimitFor(0) = %d", got)
	}
}
