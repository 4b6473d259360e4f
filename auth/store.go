package auth

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"sort"

	"github.com/nats-io/nats-server/v2/server"
	"golang.org/x/crypto/bcrypt"
)

// ErrNotInitialized is returned by Load when DATA_DIR/auth holds no server file.
var ErrNotInitialized = errors.New("auth: not initialized (run `mlx-serving auth init`)")

// ErrExists is returned by Init when credentials exist and Force is off:
// regenerating them would lock out every running client.
var ErrExists = errors.New("auth: credentials already exist")

// ErrNoCredential is returned for a role and name auth init did not generate.
var ErrNoCredential = errors.New("auth: no such credential")

const (
	dirName    = "auth"
	serverFile = "server.json"
	// Both the server file (hashes) and the credential files (passwords) are for
	// the operator only.
	fileMode = 0o600
	dirMode  = 0o700
)

// Dir is where a data dir keeps its credentials.
func Dir(dataDir string) string { return filepath.Join(dataDir, dirName) }

// Exists reports whether auth init has run for dataDir.
func Exists(dataDir string) bool {
	_, err := os.Stat(filepath.Join(Dir(dataDir), serverFile))
	return err == nil
}

// Credential is what one client needs to connect as its identity.
type Credential struct {
	Identity
	Password string `json:"password"`
	// InboxPrefix must be the connection's inbox prefix: the user may subscribe
	// only under it.
	InboxPrefix string `json:"inbox_prefix"`
}

// serverUser is one user as the server keeps it: a bcrypt hash, never the password.
type serverUser struct {
	Identity
	PasswordHash string      `json:"password_hash"`
	Permissions  Permissions `json:"permissions"`
}

type serverDoc struct {
	Users []serverUser `json:"users"`
}

// InitOptions says which credentials to generate.
type InitOptions struct {
	// DataDir gets an auth/ directory; required.
	DataDir string
	// Tenants get one producer credential each; default ["default"].
	Tenants []string
	// WorkerIDs get one worker credential each, scoped to their assign subject;
	// at least one.
	WorkerIDs []string
	// Force replaces existing credentials.
	Force bool
	// KeepPasswords rewrites existing credentials (Force implied) keeping the
	// password of every identity already there, and the cluster routes' one:
	// only added identities get new passwords, and those no longer listed lose
	// theirs (their credential files are removed). Adding or retiring a Mac
	// then leaves every running process's credential as it was; with Force
	// alone every password changed, the dispatchers' too, and during a rolling
	// restart dispatchers on the old and the new key refused each other's
	// placement tokens (red team round 20). Tenants, WorkerIDs or Routes left
	// nil keep the store's: a call naming only the workers retires no tenant.
	KeepPasswords bool
	// BcryptCost hashes the passwords; default bcrypt.DefaultCost. Tests lower it.
	BcryptCost int
	// Routes are the host:port of every server's cluster listener, written with
	// the route credentials to NATSClusterFile; default DefaultRoutes.
	Routes []string
}

// Init generates a random password for every identity, writes the server's
// user list (hashes and permissions), one credential file per identity and the
// nats-server includes (NATSAuthFile, NATSClusterFile), all readable by the
// owner only.
func Init(opts InitOptions) (*Store, error) {
	if opts.DataDir == "" {
		return nil, errors.New("auth: InitOptions.DataDir is required")
	}
	if Exists(opts.DataDir) && !opts.Force && !opts.KeepPasswords {
		return nil, fmt.Errorf("%w in %s", ErrExists, Dir(opts.DataDir))
	}
	var kept map[string]keptUser
	var keptRoutes []string
	keptRoute := ""
	if opts.KeepPasswords && Exists(opts.DataDir) {
		var err error
		if kept, keptRoute, keptRoutes, err = loadKept(Dir(opts.DataDir)); err != nil {
			return nil, err
		}
		// Lists not given are the store's (the second pass: `--workers` alone
		// retired every tenant, and the default routes replaced the cluster's).
		if opts.Tenants == nil {
			opts.Tenants = keptNames(kept, RoleProducer)
		}
		if opts.WorkerIDs == nil {
			opts.WorkerIDs = keptNames(kept, RoleWorker)
		}
		if opts.Routes == nil {
			opts.Routes = keptRoutes
		}
	}
	tenants := opts.Tenants
	if len(tenants) == 0 {
		tenants = []string{"default"}
	}
	if len(opts.WorkerIDs) == 0 {
		return nil, errors.New("auth: at least one worker id is required")
	}
	cost := opts.BcryptCost
	if cost == 0 {
		cost = bcrypt.DefaultCost
	}
	var ids []Identity
	for _, r := range []Role{RoleAdmin, RoleDispatcher, RoleGateway} {
		ids = append(ids, Identity{Role: r, User: userName(r, "")})
	}
	for _, w := range dedupe(opts.WorkerIDs) {
		ids = append(ids, Identity{Role: RoleWorker, User: userName(RoleWorker, w), WorkerID: w})
	}
	for _, t := range dedupe(tenants) {
		ids = append(ids, Identity{Role: RoleProducer, User: userName(RoleProducer, t), Tenant: t})
	}

	// Every name is checked before anything is written.
	perms := make([]Permissions, len(ids))
	for i, id := range ids {
		p, err := PermissionsFor(id)
		if err != nil {
			return nil, err
		}
		perms[i] = p
	}

	dir := Dir(opts.DataDir)
	if err := os.MkdirAll(dir, dirMode); err != nil {
		return nil, fmt.Errorf("auth: %w", err)
	}
	if err := os.Chmod(dir, dirMode); err != nil {
		return nil, fmt.Errorf("auth: %w", err)
	}
	// The routes are checked, and the cluster conf made, before any file is
	// written: a bad --routes after the credential files were rewritten left
	// them disagreeing with server.json, every restarted service refused, and
	// --keep-passwords unable to recover (the second pass).
	routes := opts.Routes
	if len(routes) == 0 {
		routes = DefaultRoutes
	}
	routePassword := keptRoute
	if routePassword == "" {
		var err error
		if routePassword, err = randomPassword(); err != nil {
			return nil, err
		}
	}
	clusterConf, err := NATSClusterConf(routePassword, routes)
	if err != nil {
		return nil, err
	}
	for _, id := range ids { // an identity that stays keeps its password, or nothing is written
		if k, ok := kept[id.User]; ok && k.cred.Identity == id && k.err != nil {
			return nil, k.err
		}
	}
	var doc serverDoc
	creds := map[string]Credential{}
	for i, id := range ids {
		var pw, hash string
		if k, ok := kept[id.User]; ok && k.cred.Identity == id {
			pw, hash = k.cred.Password, k.hash
		} else {
			var err error
			if pw, err = randomPassword(); err != nil {
				return nil, err
			}
			h, err := bcrypt.GenerateFromPassword([]byte(pw), cost)
			if err != nil {
				return nil, fmt.Errorf("auth: hash: %w", err)
			}
			hash = string(h)
		}
		delete(kept, id.User)
		doc.Users = append(doc.Users, serverUser{Identity: id, PasswordHash: hash, Permissions: perms[i]})
		c := Credential{Identity: id, Password: pw, InboxPrefix: InboxPrefix(id.User)}
		creds[id.User] = c
		if err := writeJSON(filepath.Join(dir, id.User+".json"), c); err != nil {
			return nil, err
		}
	}
	store := &Store{dir: dir, doc: doc}
	// The includes are rendered from the users the embedded server gets, so a
	// server run from ops/nats enforces the same grants.
	authConf, err := store.NATSAuthConf()
	if err != nil {
		return nil, err
	}
	if err := writeFile(store.NATSAuthConfPath(), authConf); err != nil {
		return nil, err
	}
	if err := writeFile(store.NATSClusterConfPath(), clusterConf); err != nil {
		return nil, err
	}
	// The server file is written last: its presence is what marks auth as set up.
	if err := writeJSON(filepath.Join(dir, serverFile), doc); err != nil {
		return nil, err
	}
	for user := range kept { // identities no longer listed: revoked
		if err := os.Remove(filepath.Join(dir, user+".json")); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("auth: %w", err)
		}
		store.removed = append(store.removed, user)
	}
	sort.Strings(store.removed)
	return store, nil
}

// Store is a data dir's generated credentials.
type Store struct {
	dir string
	doc serverDoc
	// regranted lists the users whose saved permissions differ from this
	// release's grants (Load replaced them): see Regranted.
	regranted []string
	// removed lists the identities Init with KeepPasswords retired.
	removed []string
}

// Load reads the credentials auth init wrote for dataDir.
func Load(dataDir string) (*Store, error) {
	dir := Dir(dataDir)
	raw, err := os.ReadFile(filepath.Join(dir, serverFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s", ErrNotInitialized, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("auth: %w", err)
	}
	var doc serverDoc
	if err := json.Unmarshal(raw, &doc); err != nil {
		return nil, fmt.Errorf("auth: %s: %w", filepath.Join(dir, serverFile), err)
	}
	// The permissions are this release's, computed from each identity, never
	// the ones saved at init: those were the grants of the release that ran
	// auth init, and a data dir kept them for ever. Upgraded, a dir from a
	// release before accounts ran with every worker, the gateway and each
	// producer refused their JetStream calls (jobs queued, none ran); one from
	// a release whose grants the accounts no longer export refused to start;
	// one from before adoption had every worker's adoption offers refused,
	// and finished jobs ended attempts_exhausted (red team round 20, F1).
	// Only the identity and the password hash are the store's to keep.
	st := &Store{dir: dir, doc: doc}
	seen := map[string]bool{}
	for i := range st.doc.Users {
		u := &st.doc.Users[i]
		// Grants follow the identity, so an identity must be one Init writes:
		// a producer-a edited to role admin, or to tenant c, would otherwise
		// get admin's or tenant c's grants (the second pass).
		if err := wellFormed(u.Identity); err != nil || seen[u.User] {
			if err == nil {
				err = errors.New("listed twice")
			}
			return nil, fmt.Errorf("auth: %s: user %q: %w", filepath.Join(dir, serverFile), u.User, err)
		}
		seen[u.User] = true
		p, err := PermissionsFor(u.Identity)
		if err != nil {
			return nil, fmt.Errorf("auth: %s: user %s: %w", filepath.Join(dir, serverFile), u.User, err)
		}
		if !reflect.DeepEqual(p, u.Permissions) {
			st.regranted = append(st.regranted, u.User)
		}
		u.Permissions = p
	}
	return st, nil
}

// wellFormed reports whether id is an identity Init writes: its user name is
// its role's (and its tenant's or worker id's), and it has only the scope its
// role takes.
func wellFormed(id Identity) error {
	name := ""
	switch id.Role {
	case RoleProducer:
		name = id.Tenant
		if id.Tenant == "" || id.WorkerID != "" {
			return errors.New("a producer has a tenant and no worker id")
		}
	case RoleWorker:
		name = id.WorkerID
		if id.WorkerID == "" || id.Tenant != "" {
			return errors.New("a worker has a worker id and no tenant")
		}
	default:
		if id.Tenant != "" || id.WorkerID != "" {
			return fmt.Errorf("role %q has no tenant or worker id", id.Role)
		}
	}
	if want := userName(id.Role, name); id.User != want {
		return fmt.Errorf("the user of this identity is %q", want)
	}
	return nil
}

// Regranted lists the users whose permissions in server.json, saved by the
// release that ran auth init, are not this release's grants; Load gave them
// this release's (up logs them). Nil when every saved grant matches.
func (s *Store) Regranted() []string { return s.regranted }

// Removed lists the users an Init with KeepPasswords retired (their
// credential files removed), sorted.
func (s *Store) Removed() []string { return s.removed }

// Dir is the directory the store's files are in.
func (s *Store) Dir() string { return s.dir }

// Identities lists every user, sorted by name.
func (s *Store) Identities() []Identity {
	out := make([]Identity, 0, len(s.doc.Users))
	for _, u := range s.doc.Users {
		out = append(out, u.Identity)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].User < out[j].User })
	return out
}

// ServerUsers are the users, hashes and permissions for natsserver.Options.Users.
func (s *Store) ServerUsers() []*server.User {
	out := make([]*server.User, 0, len(s.doc.Users))
	for _, u := range s.doc.Users {
		out = append(out, ServerUser(u.User, u.PasswordHash, u.Permissions))
	}
	return out
}

// Credential reads the credential of role; name is the tenant of a producer or
// the worker id of a worker, empty for the others.
func (s *Store) Credential(role Role, name string) (Credential, error) {
	user := userName(role, name)
	raw, err := os.ReadFile(s.CredentialPath(role, name))
	if errors.Is(err, fs.ErrNotExist) {
		return Credential{}, fmt.Errorf("%w: %s (in %s)", ErrNoCredential, user, s.dir)
	}
	if err != nil {
		return Credential{}, fmt.Errorf("auth: %w", err)
	}
	var c Credential
	if err := json.Unmarshal(raw, &c); err != nil {
		return Credential{}, fmt.Errorf("auth: %s: %w", user, err)
	}
	return c, nil
}

// CredentialPath is the file holding a credential.
func (s *Store) CredentialPath(role Role, name string) string {
	return filepath.Join(s.dir, userName(role, name)+".json")
}

func randomPassword() (string, error) {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("auth: random: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// writeJSON replaces path atomically, owner-only from the first byte.
func writeJSON(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return writeFile(path, append(data, '\n'))
}

// writeFile replaces path atomically, owner-only from the first byte.
func writeFile(path string, data []byte) error {
	// Unchanged, it is not written again: `up` writes the server's auth conf at
	// every start, and on a full disk that write (a temp file) refused to
	// start a server whose files were all in place (red team round 21).
	if st, err := os.Stat(path); err == nil && st.Mode().Perm() == fileMode {
		if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
			return nil
		}
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return fmt.Errorf("auth: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(fileMode); err != nil {
		tmp.Close()
		return fmt.Errorf("auth: %w", err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("auth: write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("auth: write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("auth: %w", err)
	}
	return nil
}

func dedupe(names []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, n := range names {
		if !seen[n] {
			seen[n] = true
			out = append(out, n)
		}
	}
	return out
}
