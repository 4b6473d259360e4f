package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/mlx-serving/mlx-serving/auth"
	"github.com/mlx-serving/mlx-serving/config"
	"github.com/mlx-serving/mlx-serving/gateway"
	"github.com/mlx-serving/mlx-serving/internal/placement"
)

func (a *app) authCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "auth",
		Short: "auth init: generate bus credentials per role and the server's permissions (DATA_DIR/auth)",
		Args:  cobra.NoArgs,
		RunE:  a.needsSubcommand,
	}
	var o authInitOptions
	initCmd := &cobra.Command{
		Use:   "init [flags]",
		Short: "generate bus credentials per role and the server's permissions (DATA_DIR/auth)",
		Args:  noArgs,
	}
	s := bindSettings(initCmd.Flags(), groupSettings, "data_dir", "worker_id")
	s.complete(initCmd)
	f := initCmd.Flags()
	f.StringVar(&o.tenants, "tenants", "default", "tenants to generate producer credentials for, comma-separated")
	f.StringVar(&o.workers, "workers", "", "worker ids to generate worker credentials for, comma-separated (default: this host's worker id)")
	f.StringVar(&o.routes, "routes", strings.Join(auth.DefaultRoutes, ","), "cluster listeners (host:port, comma-separated) written with the route credentials to "+auth.NATSClusterFile)
	f.BoolVar(&o.force, "force", false, "replace existing credentials (running clients lose access)")
	f.BoolVar(&o.keep, "keep-passwords", false, "rewrite existing credentials keeping the passwords of identities already there (and the cluster routes'); --tenants, --workers or --routes not given keep the store's lists, a list given replaces its list (retiring who is left out): adds or retires a Mac or tenant without changing anyone else's credential")
	// Both would silently keep: an operator rotating after a leak must get a
	// rotation or an error (round 20's final review).
	initCmd.MarkFlagsMutuallyExclusive("force", "keep-passwords")
	initCmd.RunE = func(*cobra.Command, []string) error {
		c, err := s.load()
		if err != nil {
			fmt.Fprintf(a.stderr, "mlx-serving auth init: %v\n", err)
			return exitWith(exitUsage)
		}
		// With --keep-passwords a list not given is the store's, not the
		// flag's default: naming the workers alone retires no tenant.
		o.tenantsSet, o.workersSet, o.routesSet = f.Changed("tenants"), f.Changed("workers"), f.Changed("routes")
		return exitWith(authInit(c, o, a.stdout, a.stderr))
	}
	cmd.AddCommand(initCmd)
	return cmd
}

type authInitOptions struct {
	tenants, workers, routes          string
	force, keep                       bool
	tenantsSet, workersSet, routesSet bool
}

func authInit(c config.Config, o authInitOptions, stdout, stderr io.Writer) int {
	tenants, workerIDs, routes := splitNames(o.tenants), splitNames(o.workers), splitNames(o.routes)
	if len(workerIDs) == 0 {
		workerIDs = []string{workerID(c)}
	}
	if o.keep && auth.Exists(c.DataDir) {
		if !o.tenantsSet {
			tenants = nil
		}
		if !o.workersSet {
			workerIDs = nil
		}
		if !o.routesSet {
			routes = nil
		}
	}
	store, err := auth.Init(auth.InitOptions{DataDir: c.DataDir, Tenants: tenants, WorkerIDs: workerIDs, Routes: routes, Force: o.force, KeepPasswords: o.keep})
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving auth init: %v\n", err)
		if errors.Is(err, auth.ErrExists) {
			fmt.Fprintln(stderr, "use --keep-passwords to add or remove identities keeping the others' passwords, or --force to replace them all")
		}
		return exitFailed
	}
	fmt.Fprintf(stdout, "credentials written to %s (owner-only); `up` with this data dir now requires them.\n\n", store.Dir())
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "USER\tROLE\tSCOPE\tFILE")
	for _, id := range store.Identities() {
		scope := "-"
		switch {
		case id.Tenant != "":
			scope = "tenant " + id.Tenant
		case id.WorkerID != "":
			scope = "worker " + id.WorkerID
		}
		name := id.Tenant + id.WorkerID
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", id.User, id.Role, scope, store.CredentialPath(id.Role, name))
	}
	_ = tw.Flush()
	if removed := store.Removed(); len(removed) > 0 {
		fmt.Fprintf(stdout, "\nRetired (credential files removed; reload the servers with the new %s): %s\n", auth.NATSAuthFile, strings.Join(removed, ", "))
	}
	fmt.Fprintln(stdout, "\nClients connect with --nats-user USER --nats-password PASSWORD (the file's \"password\").")
	fmt.Fprintf(stdout, "For servers run from ops/nats, copy next to each server's configuration (e.g. /etc/nats/):\n  %s  (users and permissions)\n  %s  (route credentials and routes)\n",
		store.NATSAuthConfPath(), store.NATSClusterConfPath())
	return 0
}

func splitNames(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// loadAuth returns the data dir's credentials, or nil when auth init has not run.
func loadAuth(c config.Config) (*auth.Store, error) {
	if !auth.Exists(c.DataDir) {
		return nil, nil
	}
	return auth.Load(c.DataDir)
}

// asRole returns c connecting as role's generated credential (name: the worker
// id of a worker). Credentials given explicitly (user or creds file) win, and
// without a store c is returned unchanged.
func asRole(c config.Config, store *auth.Store, role auth.Role, name string) (config.Config, error) {
	if store == nil || c.NATSUser != "" || c.NATSCreds != "" {
		return c, nil
	}
	cred, err := store.Credential(role, name)
	if err != nil {
		if errors.Is(err, auth.ErrNoCredential) && role == auth.RoleWorker {
			return c, fmt.Errorf("%w: run `mlx-serving auth init --workers %s --force` (or pass --nats-user/--nats-password)", err, name)
		}
		return c, err
	}
	c.NATSUser, c.NATSPassword = cred.User, cred.Password
	return c, nil
}

// serviceRole is the role a long-running command connects as.
func serviceRole(c config.Config, name string) (auth.Role, string) {
	switch name {
	case "worker":
		return auth.RoleWorker, workerID(c)
	case "dispatcher":
		return auth.RoleDispatcher, ""
	case "gateway":
		return auth.RoleGateway, ""
	}
	return auth.RoleAdmin, ""
}

// serviceConfig is c with the credential of the service's role, when the data
// dir has generated credentials and none were given.
func serviceConfig(c config.Config, name string) (config.Config, error) {
	store, err := loadAuth(c)
	if err != nil {
		return c, err
	}
	role, scope := serviceRole(c, name)
	return asRole(c, store, role, scope)
}

// roleConns opens one connection per part of `up` when auth is on, so each part
// holds only its role's grants; without auth every part shares shared.
type roleConns struct {
	shared *nats.Conn
	opened []*nats.Conn
}

func (r *roleConns) conn(ctx context.Context, c config.Config, store *auth.Store, role auth.Role, name string, log zerolog.Logger) (*nats.Conn, error) {
	if store == nil {
		return r.shared, nil
	}
	rc, err := asRole(c, store, role, name)
	if err != nil {
		return nil, err
	}
	nc, _, err := connect(ctx, rc, "mlx-serving-up-"+string(role), log)
	if err != nil {
		return nil, fmt.Errorf("connect as %s: %w", role, err)
	}
	r.opened = append(r.opened, nc)
	return nc, nil
}

func (r *roleConns) close() {
	for _, nc := range r.opened {
		nc.Close()
	}
}

// tenantLimits is the gateway's per-tenant limits from the configuration.
func tenantLimits(c config.Config) gateway.TenantLimits {
	return gateway.TenantLimits{
		MaxInFlight:       c.TenantMaxInFlight,
		MaxTokens:         c.TenantMaxTokens,
		MaxPromptChars:    c.TenantMaxPromptChars,
		RequestsPerSecond: float64(c.TenantRate),
		Burst:             c.TenantBurst,
	}
}

// placementKey is the dispatcher's placement key (internal/placement),
// derived from the secrets it connects with (password, token, the contents of
// its creds file and TLS client key): every dispatcher of one credential
// (auth init writes one) derives the same key, so each can adopt the others'
// records, and no other role knows it. With no secret, on a server that lets
// anyone in, it is the key of no secret, as open as the server; on a server
// that requires authentication (credentials given only in the NATS URL, or a
// TLS certificate whose key this process does not read, say) it is Off: the key of no secret would let any worker credential end any job. A
// file that cannot be read gives a key of its own: records are then not
// adopted across dispatchers, and jobs run again as before adoption.
func placementKey(c config.Config, nc *nats.Conn) placement.Key {
	read := func(path string) string {
		if path == "" {
			return ""
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return "unreadable " + path
		}
		return string(b)
	}
	user, password, token := c.NATSUser, c.NATSPassword, ""
	if nc != nil {
		user, password, token = nc.Opts.User, nc.Opts.Password, nc.Opts.Token
	}
	return placementKeyFor(nc != nil && nc.AuthRequired(), user, password, token, read(c.NATSCreds), read(c.NATSKey))
}

// placementKeyFor is placementKey's rule: the key of the secrets, or Off when
// there is no secret and the server requires authentication.
func placementKeyFor(authRequired bool, user, password, token, creds, tlsKey string) placement.Key {
	if password == "" && token == "" && creds == "" && tlsKey == "" {
		if authRequired {
			return placement.Off()
		}
		return placement.KeyFrom()
	}
	return placement.KeyFrom(user, password, token, creds, tlsKey)
}
