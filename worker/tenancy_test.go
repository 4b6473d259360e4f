package worker

import (
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// tenantJob is newJob for tenant, under the given id.
func tenantJob(tenant, id, prompt string, maxTokens int) schemas.JobRequest {
	j := newJob(prompt, maxTokens)
	j.ID, j.Tenant, j.ReplyTo = id, tenant, bus.ReplySubject(tenant, id)
	return j
}

// Job ids are unique only within a tenant: two tenants' jobs of one id run on
// one worker at once, and both complete (the runtime's request id names the
// tenant; before, the second was refused duplicate_request: the red team's F2).
// Mutation caught: runtimeRequestID without the tenant (b's job fails).
func TestE2ESameJobIDTwoTenants(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, realConfig(t, b, "w-ids"), true)
	ctx := within(t, 60*time.Second)

	long := tenantJob("a", "order-1910", "Tell me a long story", 2000)
	short := tenantJob("b", "order-1910", "b's real work", 5)
	ca, cb := collect(t, b.nc, long.ReplyTo), collect(t, b.nc, short.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", long)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	if tok, _ := ca.next(ctx); tok == nil {
		t.Fatal("a's job sent no token")
	}
	if rep := assign(t, b.nc, a.ID(), batch("tiny", short)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	if r := cb.untilResult(ctx); r.Status != schemas.StatusCompleted {
		t.Fatalf("b's job %s (%+v), want completed while a's job of the same id runs", r.Status, r.Error)
	}
	if r := ca.untilResult(ctx); r.Status != schemas.StatusCompleted {
		t.Fatalf("a's job %s (%+v), want completed", r.Status, r.Error)
	}
}

// The runtime's prompt cache is scoped by tenant: tenant a asking the prompt
// tenant b just asked reuses nothing of it (cached_tokens told a what b sent:
// the red team's F1), while b asking again reuses all but one token.
// Mutation caught: generateParams without CacheScope (a reuses b's tokens).
func TestE2EPromptCacheIsPerTenant(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, realConfig(t, b, "w-scope"), true)
	ctx := within(t, 60*time.Second)
	prompt := "Customer record: the PIN is 96279064. " + strings.Repeat("Account history, line by line. ", 20)
	run := func(j schemas.JobRequest) *schemas.ResultMsg {
		t.Helper()
		c := collect(t, b.nc, j.ReplyTo)
		if rep := assign(t, b.nc, a.ID(), batch("tiny", j)); rep.Status != schemas.AssignAccepted {
			t.Fatalf("%+v", rep)
		}
		r := c.untilResult(ctx)
		if r.Status != schemas.StatusCompleted {
			t.Fatalf("job %s/%s: %s", j.Tenant, j.ID, r.Status)
		}
		return r
	}
	first := run(tenantJob("b", "b-1", prompt, 4))
	other := run(tenantJob("a", "a-1", prompt, 4))
	again := run(tenantJob("b", "b-2", prompt, 4))
	if n := other.Usage.CachedTokens; n > 2 {
		t.Fatalf("tenant a reused %d cached tokens of tenant b's prompt", n)
	}
	if want := first.Usage.PromptTokens - 1; again.Usage.CachedTokens != want {
		t.Fatalf("tenant b reused %d cached tokens of its own prompt, want %d (is the cache on?)", again.Usage.CachedTokens, want)
	}
}
