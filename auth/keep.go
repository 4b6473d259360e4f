package auth

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"

	"golang.org/x/crypto/bcrypt"
)

// What Init with KeepPasswords keeps of a store: each identity's password,
// the routes' password and routes.

// keptUser is an identity's credential and hash, read to be kept; err says
// why its password cannot be (its credential file missing, or not matching
// the hash), which matters only if the identity stays.
type keptUser struct {
	cred Credential
	hash string
	err  error
}

// routePasswordRE and routeURLRE read back the routes' password and routes
// from a nats-cluster.conf Init wrote (NATSClusterConf).
var (
	routePasswordRE = regexp.MustCompile(`(?m)^\s*password:\s*"([A-Za-z0-9_=+/-]+)"\s*$`)
	routeURLRE      = regexp.MustCompile(`nats-route://[^:@\s]+:[^@\s]+@([^\s",]+)`) // quoted: an IPv6 host's ] stays
)

// loadKept reads the credentials of dir's identities, and the routes'
// password and routes, for KeepPasswords. A credential file that is missing
// or does not match its hash is noted on its identity (an error if it stays:
// Init), and a cluster conf whose
// password cannot be read back (a fresh one would break the routes on the
// next reload: the second pass): their passwords cannot be kept.
func loadKept(dir string) (map[string]keptUser, string, []string, error) {
	raw, err := os.ReadFile(filepath.Join(dir, serverFile))
	if err != nil {
		return nil, "", nil, fmt.Errorf("auth: %w", err)
	}
	var doc serverDoc
	if err := json.Unmarshal(raw, &doc); err != nil {
		return nil, "", nil, fmt.Errorf("auth: %s: %w", filepath.Join(dir, serverFile), err)
	}
	kept := map[string]keptUser{}
	for _, u := range doc.Users {
		var c Credential
		data, err := os.ReadFile(filepath.Join(dir, u.User+".json"))
		if err == nil {
			err = json.Unmarshal(data, &c)
		}
		if err == nil && bcrypt.CompareHashAndPassword([]byte(u.PasswordHash), []byte(c.Password)) != nil {
			err = errors.New("its password does not match the server's hash")
		}
		if err != nil {
			err = fmt.Errorf("auth: keep the password of %s: %w (leave it out to retire it, or auth init --force makes new ones for all)", u.User, err)
		}
		c.Identity = u.Identity // the server's, not the file's: names come from it
		kept[u.User] = keptUser{cred: c, hash: u.PasswordHash, err: err}
	}
	conf, err := os.ReadFile(filepath.Join(dir, NATSClusterFile))
	if errors.Is(err, fs.ErrNotExist) {
		return kept, "", nil, nil
	}
	if err != nil {
		return nil, "", nil, fmt.Errorf("auth: %w", err)
	}
	m := routePasswordRE.FindSubmatch(conf)
	if m == nil {
		return nil, "", nil, fmt.Errorf("auth: keep the routes' password: none found in %s as auth init writes it (auth init --force makes a new one)", filepath.Join(dir, NATSClusterFile))
	}
	var routes []string
	for _, r := range routeURLRE.FindAllSubmatch(conf, -1) {
		routes = append(routes, string(r[1]))
	}
	return kept, string(m[1]), routes, nil
}

// keptNames lists the tenants (RoleProducer) or worker ids (RoleWorker) of
// the kept identities, sorted.
func keptNames(kept map[string]keptUser, role Role) []string {
	var out []string
	for _, k := range kept {
		switch {
		case role == RoleProducer && k.cred.Role == RoleProducer:
			out = append(out, k.cred.Tenant)
		case role == RoleWorker && k.cred.Role == RoleWorker:
			out = append(out, k.cred.WorkerID)
		}
	}
	sort.Strings(out)
	return out
}
