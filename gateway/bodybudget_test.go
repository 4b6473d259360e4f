package gateway

import (
	"bytes"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

// waitHeld returns once tenant's bodies hold want bytes of g's budget. The
// budget tells it of every change (bodyBudget.changed), so it waits for the
// gateway's reads, not for a clock; the timer is a guard against a broken
// gateway, not an assertion.
func waitHeld(t *testing.T, g *Gateway, tenant string, want int64) {
	t.Helper()
	b := g.bodies
	b.mu.Lock()
	if b.changed == nil {
		b.changed = make(chan struct{}, 1)
	}
	changed := b.changed
	b.mu.Unlock()
	guard := time.After(20 * time.Second)
	for {
		b.mu.Lock()
		got := b.held[tenant]
		b.mu.Unlock()
		if got == want {
			return
		}
		select {
		case <-changed:
		case <-guard:
			t.Fatalf("tenant %s holds %d body bytes, want %d", tenant, got, want)
		}
	}
}

// budgetUsed is the bytes all tenants' bodies hold.
func budgetUsed(g *Gateway) int64 {
	g.bodies.mu.Lock()
	defer g.bodies.mu.Unlock()
	return g.bodies.used
}

// The red team's attack (round 8, N3): one tenant opens connections that
// declare bodies at the limit and send none of their bytes. Declared lengths
// reserve nothing, so they hold nothing, and another tenant's request, or even
// that tenant's own, is read as usual.
// Mutation caught: readBody charging the declared length before reading
// (hold.grow(bound) first: the second connection is refused, 503 instead of
// 100 Continue, as b's request was in the attack).
func TestIdleBodiesHoldNothing(t *testing.T) {
	t.Parallel()
	g, addr := bodyGateway(t, func(c *Config) { c.MaxBodyBytes, c.MaxBodyBytesReading = 1000, 4000 })
	for range 8 { // twice the budget, declared
		startPost(t, addr, "tok-a", 1000).expectContinue() // its handler is reading, and gets nothing
	}
	if used := budgetUsed(g); used != 0 {
		t.Fatalf("bodies that sent nothing hold %d bytes of the budget", used)
	}
	for _, token := range []string{"tok-b", "tok-a"} {
		rc := startPost(t, addr, token, 1000)
		rc.expectContinue()
		rc.send(strings.Repeat(" ", 1000))
		expectError(t, rc.answer(), http.StatusBadRequest, "", "invalid_value") // read in full, then decoded
	}
	if n := value(observed(g).Errors.WithLabelValues(codeBodyCapacity)); n != 0 {
		t.Errorf("%s answers counted: %v, want 0", codeBodyCapacity, n)
	}
}

// A tenant that does send bytes may hold its share of the budget (a quarter,
// here one body's limit: 1000 of 4000) and no more: past it its bodies are
// refused, mid-read or before, while another tenant's body is read as usual.
// Mutation caught: bodyBudget.refusal without its share case (a's second body
// is read in full: 400 instead of 503).
func TestTenantOverItsBodyShareIsRefusedAlone(t *testing.T) {
	t.Parallel()
	g, addr := bodyGateway(t, func(c *Config) { c.MaxBodyBytes, c.MaxBodyBytesReading = 1000, 4000 })
	first := startPost(t, addr, "tok-a", 1000)
	first.expectContinue()
	first.send(strings.Repeat("x", 400))
	waitHeld(t, g, "a", 512) // its buffer's first growth

	// A chunked body fits a byte beside it, so it is read, and refused when its
	// buffer grows past a's share (512 + 512 > 1000).
	second := startPost(t, addr, "tok-a", -1)
	second.expectContinue()
	chunk := strings.Repeat("y", 600)
	second.send(fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(chunk), chunk))
	resp := second.answer()
	if resp.Header.Get("Retry-After") == "" {
		t.Error("503 without Retry-After")
	}
	e := expectError(t, resp, http.StatusServiceUnavailable, "", codeBodyCapacity)
	if !strings.Contains(e.Error.Message, `"a"`) {
		t.Errorf("message %q does not name the tenant", e.Error.Message)
	}
	// A declared length that cannot fit beside a's bytes is refused unread.
	expectError(t, startPost(t, addr, "tok-a", 1000).answer(), http.StatusServiceUnavailable, "", codeBodyCapacity)
	waitHeld(t, g, "a", 512) // the refused bodies hold nothing

	// b is not a: its body of the same size is read in full.
	other := startPost(t, addr, "tok-b", 1000)
	other.expectContinue()
	other.send(strings.Repeat(" ", 1000))
	expectError(t, other.answer(), http.StatusBadRequest, "", "invalid_value")

	for tenant, want := range map[string]float64{"a": 2, "b": 0} {
		if n := value(observed(g).TenantRefusals.WithLabelValues(tenant, codeBodyCapacity)); n != want {
			t.Errorf("%s's %s refusals: %v, want %v", tenant, codeBodyCapacity, n, want)
		}
	}
	// a's share comes back with its body.
	first.send(strings.Repeat("x", 600))
	expectError(t, first.answer(), http.StatusBadRequest, "", "invalid_value")
	waitHeld(t, g, "a", 0)
	startPost(t, addr, "tok-a", 1000).expectContinue()
}

// Shares add up to more than the budget once there are more tenants than
// bodyShares; the budget still bounds them all together. Four tenants each at
// their share fill it; a fifth is refused (as the budget's doing, not its own)
// until one of them is done.
// Mutation caught: bodyBudget.refusal without its capacity case (e's body is
// read: 100 Continue instead of 503).
func TestBodyBytesOfAllTenantsStayWithinTheBudget(t *testing.T) {
	t.Parallel()
	tenants := []string{"a", "b", "c", "d"}
	g, addr := bodyGateway(t, func(c *Config) {
		c.MaxBodyBytes, c.MaxBodyBytesReading = 1000, 4000
		c.TokenTenants = map[string]string{"tok-a": "a", "tok-b": "b", "tok-c": "c", "tok-d": "d", "tok-e": "e"}
	})
	held := map[string]*rawConn{}
	for _, tenant := range tenants {
		rc := startPost(t, addr, "tok-"+tenant, 1000)
		rc.expectContinue()
		rc.send(strings.Repeat("x", 999))
		waitHeld(t, g, tenant, 1000)
		held[tenant] = rc
	}
	if used := budgetUsed(g); used != 4000 {
		t.Fatalf("%d bytes held, want 4000", used)
	}
	expectError(t, startPost(t, addr, "tok-e", 100).answer(), http.StatusServiceUnavailable, "", codeBodyCapacity)
	if n := value(observed(g).TenantRefusals.WithLabelValues("e", codeBodyCapacity)); n != 0 {
		t.Errorf("e's %s refusals: %v, want 0 (the budget was full, e held nothing)", codeBodyCapacity, n)
	}

	held["d"].send("x")
	expectError(t, held["d"].answer(), http.StatusBadRequest, "", "invalid_value")
	waitHeld(t, g, "d", 0)
	again := startPost(t, addr, "tok-e", 100)
	again.expectContinue()
	again.send(strings.Repeat(" ", 100))
	expectError(t, again.answer(), http.StatusBadRequest, "", "invalid_value")
}

// The buffer a body is read into is charged before it is allocated and grows
// only with the bytes that arrive: what the budget counts is what the body
// holds, whatever length it declared.
// Mutation caught: readCharged allocating bound up front (make([]byte, 0,
// bound): a 1 MiB buffer charged 512 bytes for a 10-byte body).
func TestBodyBufferIsChargedBeforeItIsAllocated(t *testing.T) {
	budget := newBodyBudget(1<<20, 1<<20)
	for _, tc := range []struct {
		sent, bound int
		wantCap     int64
	}{
		{0, 1 << 20, 0},       // nothing sent: nothing held
		{10, 1 << 20, 512},    // declared 1 MiB, sent 10 bytes
		{3000, 1 << 20, 4096}, // doubling: 512, 1024, 2048, 4096
		{3000, 3000, 3000},    // never past the declared length
	} {
		hold := &bodyHold{budget: budget, tenant: "a"}
		sent := bytes.Repeat([]byte("z"), tc.sent)
		got, err := readCharged(iotest.OneByteReader(bytes.NewReader(sent)), hold, int64(tc.bound))
		if err != nil || !bytes.Equal(got, sent) {
			t.Fatalf("sent %d bytes: read %d, %v", tc.sent, len(got), err)
		}
		if int64(cap(got)) != hold.n || hold.n != tc.wantCap {
			t.Errorf("sent %d of %d: buffer of %d bytes, %d charged, want %d", tc.sent, tc.bound, cap(got), hold.n, tc.wantCap)
		}
		hold.release()
	}
	if budget.used != 0 || len(budget.held) != 0 {
		t.Errorf("after release: %d bytes used, %v held", budget.used, budget.held)
	}

	// Past the share: refused, and what was charged is the hold's to release.
	small := newBodyBudget(1000, 1000)
	hold := &bodyHold{budget: small, tenant: "a"}
	_, err := readCharged(bytes.NewReader(make([]byte, 3000)), hold, 3000)
	var full errBodyBudget
	if !errors.As(err, &full) || full.why != bodyShareFull || hold.n > 1000 {
		t.Errorf("3000 bytes into a share of 1000: %v, %d charged", err, hold.n)
	}
	hold.release()
	if small.used != 0 {
		t.Errorf("after release: %d bytes used", small.used)
	}
}
