package auth

import (
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
)

// Every identity outside the JetStream account connects under the imported
// API prefix (bus.NewJetStream reads it from the user name), and its account
// imports exactly what its grants publish to, nothing more: a relay reaches
// no subject its user could not publish on itself.
// Mutation caught: buildAccounts importing a grant under the system account's
// own name instead of the client's local, prefixed one (accountImport{...,
// s, s}): the grants are no longer what the account imports.
func TestAccountsImportOnlyWhatGrantsPublish(t *testing.T) {
	t.Parallel()
	store, err := Init(InitOptions{DataDir: t.TempDir(), Tenants: []string{"a", "b"}, WorkerIDs: []string{"w1", "w2"}, BcryptCost: 4})
	if err != nil {
		t.Fatal(err)
	}
	accs, err := buildAccounts(store.doc.Users)
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]account{}
	for _, a := range accs {
		byName[a.name] = a
	}
	for _, id := range store.Identities() {
		wantPrefix := ""
		if AccountOf(id) != AccountSystem {
			wantPrefix = subjects.ImportedAPIPrefix
		}
		if got := subjects.APIPrefixForUser(id.User); got != wantPrefix {
			t.Errorf("%s: API prefix %q, want %q", id.User, got, wantPrefix)
		}
		if AccountOf(id) == AccountSystem {
			continue
		}
		p, err := PermissionsFor(id)
		if err != nil {
			t.Fatal(err)
		}
		a := byName[AccountOf(id)]
		local := map[string]bool{}
		for _, im := range a.svcImports {
			to := im.to
			if to == "" {
				to = im.subject
			}
			local[to] = true
		}
		if len(local) != len(p.PublishAllow) {
			t.Errorf("%s: %d service imports, %d publish grants", id.User, len(local), len(p.PublishAllow))
		}
		for _, s := range p.PublishAllow {
			if !local[s] {
				t.Errorf("%s: grant %q not imported", id.User, s)
			}
		}
	}
	// Tenant a's account sees only a's job subjects.
	for _, im := range byName[AccountTenant("a")].svcImports {
		if subsetOf(subjects.Job("b", "normal", "x"), im.subject) {
			t.Errorf("tenant a's account imports %q, which holds b's jobs", im.subject)
		}
	}
}

func TestSubsetOf(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		s, p string
		want bool
	}{
		{"mlx.jobs.a.*.*", "mlx.jobs.*.*.*", true},
		{"mlx.jobs.*.*.*", "mlx.jobs.a.*.*", false},
		{"mlx.reply.a.>", "mlx.reply.>", true},
		{"mlx.reply.>", "mlx.reply.a.>", false},
		{"$JS.API.DIRECT.GET.RESULTS.mlx.results.a.>", "$JS.API.DIRECT.GET.>", true},
		{"$JS.API.STREAM.INFO.JOBS", "$JS.API.STREAM.INFO.*", true},
		{"$JS.API.STREAM.INFO.JOBS.x", "$JS.API.STREAM.INFO.*", false},
		{"mlx.reply", "mlx.reply.>", false},
	} {
		if got := subsetOf(c.s, c.p); got != c.want {
			t.Errorf("subsetOf(%q, %q) = %v", c.s, c.p, got)
		}
	}
}
