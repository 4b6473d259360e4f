package auth

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// files reads every file of dir's auth directory.
func files(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	ents, err := os.ReadDir(Dir(dir))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(Dir(dir), e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = string(b)
	}
	return out
}

// KeepPasswords with only the workers given keeps the store's tenants and
// routes, an IPv6 one too: the second pass's `--keep-passwords --workers ...`
// retired every tenant (the flag's default "default" replaced them) and put
// the default routes in the cluster conf; the final review's IPv6 route was
// read back cut at its "]". Only the added worker's files are new.
// Mutations caught: Init not filling nil lists from the store (tenant a
// retired, producer-default made), and routeURLRE stopping at "]": red.
func TestKeepPasswordsKeepsTheListsNotGiven(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if _, err := Init(InitOptions{DataDir: dir, Tenants: []string{"a", "b"}, WorkerIDs: []string{"w1"}, Routes: []string{"h1:6222", "[fd00::1]:6222"}, BcryptCost: 4}); err != nil {
		t.Fatal(err)
	}
	before := files(t, dir)
	store, err := Init(InitOptions{DataDir: dir, WorkerIDs: []string{"w1", "w2"}, BcryptCost: 4, KeepPasswords: true})
	if err != nil {
		t.Fatal(err)
	}
	if r := store.Removed(); r != nil {
		t.Fatalf("retired %v, want none", r)
	}
	after := files(t, dir)
	for name, was := range before {
		if name == serverFile || name == NATSAuthFile {
			continue // they list the added worker
		}
		if after[name] != was {
			t.Errorf("%s changed", name)
		}
	}
	for name := range after {
		if _, ok := before[name]; !ok && name != "worker-w2.json" {
			t.Errorf("%s is new; only worker-w2.json should be", name)
		}
	}
}

// A bad route leaves every file as it was: Init checked the routes after it
// had rewritten the credential files, which then disagreed with server.json
// (every restarted service refused, and --keep-passwords could not recover:
// the second pass).
// Mutation caught: the cluster conf made after the credential loop: red.
func TestBadRouteWritesNothing(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if _, err := Init(InitOptions{DataDir: dir, Tenants: []string{"a"}, WorkerIDs: []string{"w1"}, BcryptCost: 4}); err != nil {
		t.Fatal(err)
	}
	before := files(t, dir)
	if _, err := Init(InitOptions{DataDir: dir, Tenants: []string{"a", "b"}, WorkerIDs: []string{"w1"}, Routes: []string{"h1"}, BcryptCost: 4, Force: true}); err == nil {
		t.Fatal("a route without a port was taken")
	}
	after := files(t, dir)
	if len(after) != len(before) {
		t.Errorf("%d files after the refused init, %d before", len(after), len(before))
	}
	for name, was := range before {
		if after[name] != was {
			t.Errorf("%s changed by the refused init", name)
		}
	}
}

// A cluster conf whose password cannot be read back refuses KeepPasswords
// instead of making a new routes' password, which would break the routes on
// the next reload (the second pass).
// Mutation caught: loadKept returning an empty password there: red.
func TestKeepPasswordsRefusesAnUnreadableRoutesPassword(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if _, err := Init(InitOptions{DataDir: dir, Tenants: []string{"a"}, WorkerIDs: []string{"w1"}, BcryptCost: 4}); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(Dir(dir), NATSClusterFile)
	conf, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(strings.Replace(string(conf), "password: ", "password = ", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Init(InitOptions{DataDir: dir, Tenants: []string{"a"}, WorkerIDs: []string{"w1"}, BcryptCost: 4, KeepPasswords: true}); err == nil || !strings.Contains(err.Error(), "routes' password") {
		t.Fatalf("err %v, want the routes' password refused", err)
	}
}

// Load refuses an identity Init would not write: grants follow the identity,
// so producer-a edited to role admin (or to tenant c) got admin's (or tenant
// c's) grants once Load computed them (the second pass); a user listed twice
// is refused too.
// Mutation caught: Load without wellFormed: red.
func TestLoadRefusesIdentitiesInitWouldNotWrite(t *testing.T) {
	t.Parallel()
	for name, edit := range map[string]func(*serverDoc){
		"producer made admin": func(d *serverDoc) { d.Users[len(d.Users)-1].Role = RoleAdmin },
		"tenant changed":      func(d *serverDoc) { d.Users[len(d.Users)-1].Tenant = "c" },
		"user listed twice":   func(d *serverDoc) { d.Users = append(d.Users, d.Users[0]) },
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			if _, err := Init(InitOptions{DataDir: dir, Tenants: []string{"a"}, WorkerIDs: []string{"w1"}, BcryptCost: 4}); err != nil {
				t.Fatal(err)
			}
			editServerDoc(t, dir, func(doc *serverDoc) {
				if last := doc.Users[len(doc.Users)-1]; last.Role != RoleProducer {
					t.Fatalf("the last user is %s, want the producer", last.User)
				}
				edit(doc)
			})
			if _, err := Load(dir); err == nil {
				t.Fatal("Load took it")
			}
		})
	}
}

// Retiring an identity whose credential file is already gone works (its
// password is not kept, so it need not be read); an identity that stays with
// its file gone refuses the run, and nothing is written (the final review:
// any missing file refused the run, and only --force, rotating everyone, got
// out).
// Mutation caught: loadKept failing on any missing file: red.
func TestKeepPasswordsRetiresAWorkerWhoseFileIsGone(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if _, err := Init(InitOptions{DataDir: dir, Tenants: []string{"a"}, WorkerIDs: []string{"w1", "w2", "w3"}, BcryptCost: 4}); err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{"worker-w2.json", "worker-w3.json"} {
		if err := os.Remove(filepath.Join(Dir(dir), w)); err != nil {
			t.Fatal(err)
		}
	}
	before := files(t, dir)
	if _, err := Init(InitOptions{DataDir: dir, WorkerIDs: []string{"w1", "w3"}, BcryptCost: 4, KeepPasswords: true}); err == nil || !strings.Contains(err.Error(), "worker-w3") {
		t.Fatalf("err %v, want w3's missing file refused while it stays", err)
	}
	if after := files(t, dir); len(after) != len(before) || after[serverFile] != before[serverFile] {
		t.Fatal("the refused run wrote files")
	}
	store, err := Init(InitOptions{DataDir: dir, WorkerIDs: []string{"w1"}, BcryptCost: 4, KeepPasswords: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(store.Removed(), ","); got != "worker-w2,worker-w3" {
		t.Fatalf("retired %q, want worker-w2,worker-w3", got)
	}
}

// editServerDoc rewrites dir's auth/server.json through edit, as a hand edit
// or an older release would leave it.
func editServerDoc(t *testing.T, dir string, edit func(*serverDoc)) {
	t.Helper()
	path := filepath.Join(Dir(dir), serverFile)
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var doc serverDoc
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	edit(&doc)
	if err := writeJSON(path, doc); err != nil {
		t.Fatal(err)
	}
}
