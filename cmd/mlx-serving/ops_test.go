package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/spf13/pflag"

	"github.com/mlx-serving/mlx-serving/auth"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

// These tests run nats-server from ops/nats/*.conf as an operator deploys them
// (ops/nats/README.md): next to the includes `auth init` generates, with the
// commented tls blocks uncommented and pointing at certificates made here, and
// connect with the CLI's own flags and connection code.

// tlsDocDir is where the ops files' tls blocks expect the certificates.
const tlsDocDir = "/etc/nats/tls/"

var storeDirLine = regexp.MustCompile(`(?m)^(\s*)store_dir:.*$`)

// uncommentTLS uncomments every "# tls {" ... "# }" block of conf and returns
// how many there were.
func uncommentTLS(conf string) (string, int) {
	lines := strings.Split(conf, "\n")
	blocks, in := 0, false
	for i, l := range lines {
		trimmed := strings.TrimSpace(l)
		if trimmed == "# tls {" {
			in = true
			blocks++
		}
		if in {
			indent := l[:len(l)-len(strings.TrimLeft(l, " "))]
			lines[i] = indent + strings.TrimPrefix(strings.TrimPrefix(trimmed, "#"), " ")
			if trimmed == "# }" {
				in = false
			}
		}
	}
	return strings.Join(lines, "\n"), blocks
}

// deployOps writes ops/nats/<name> into dir as an operator deploys it: the
// includes auth init generated copied next to it, TLS turned on with the
// certificates in certDir, the JetStream store in storeDir. wantTLS is the
// number of tls blocks the file must document.
func deployOps(t *testing.T, name, dir, certDir, storeDir string, store *auth.Store, wantTLS int) string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "ops", "nats", name))
	if err != nil {
		t.Fatal(err)
	}
	conf, n := uncommentTLS(string(raw))
	if n != wantTLS {
		t.Fatalf("ops/nats/%s documents %d tls blocks, want %d", name, n, wantTLS)
	}
	if c := strings.Count(conf, `_file: "`+tlsDocDir); c != 3*wantTLS {
		t.Fatalf("ops/nats/%s: %d files under %s, want cert_file, key_file and ca_file per block", name, c, tlsDocDir)
	}
	conf = strings.ReplaceAll(conf, `_file: "`+tlsDocDir, `_file: "`+certDir+string(filepath.Separator))
	conf = storeDirLine.ReplaceAllString(conf, "${1}store_dir: "+strconv.Quote(storeDir))
	for _, src := range []string{store.NATSAuthConfPath(), store.NATSClusterConfPath()} {
		data, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(src)), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// loadOps parses a deployed ops file and checks what every server must have:
// every generated user, TLS, monitoring on loopback only.
func loadOps(t *testing.T, path string, store *auth.Store) *server.Options {
	t.Helper()
	opts, err := server.ProcessConfigFile(path)
	if err != nil {
		t.Fatalf("nats-server refuses %s: %v", path, err)
	}
	if len(opts.Users) != len(store.Identities()) {
		t.Fatalf("%s: %d users, want the %d auth init generated", filepath.Base(path), len(opts.Users), len(store.Identities()))
	}
	if opts.TLSConfig == nil {
		t.Fatalf("%s: no client TLS", filepath.Base(path))
	}
	if opts.HTTPHost != "127.0.0.1" {
		t.Fatalf("%s: monitoring on %q, want loopback", filepath.Base(path), opts.HTTPHost)
	}
	// Free loopback ports instead of the deployed ones; monitoring off.
	opts.Host, opts.Port, opts.HTTPPort = "127.0.0.1", -1, 0
	opts.NoSigs = true
	return opts
}

func runServer(t *testing.T, opts *server.Options) *server.Server {
	t.Helper()
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Start()
	t.Cleanup(srv.Shutdown)
	if !srv.ReadyForConnections(20 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	return srv
}

// makeCerts writes a throwaway CA and a certificate it signed for 127.0.0.1
// and localhost, usable by servers and, for routes, as clients; named as the
// ops files' tls blocks expect.
func makeCerts(t *testing.T, dir string) (caFile string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "mlx-serving test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "nats"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	caFile = filepath.Join(dir, "ca.pem")
	for path, block := range map[string]*pem.Block{
		caFile:                                {Type: "CERTIFICATE", Bytes: caDER},
		filepath.Join(dir, "server-cert.pem"): {Type: "CERTIFICATE", Bytes: der},
		filepath.Join(dir, "server-key.pem"):  {Type: "PRIVATE KEY", Bytes: keyDER},
	} {
		if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return caFile
}

// cliConnect connects the way every mlx-serving command does: flags through
// the configuration, then connect.
func cliConnect(t *testing.T, timeout time.Duration, args ...string) (*nats.Conn, error) {
	t.Helper()
	fs := pflag.NewFlagSet("ops test", pflag.ContinueOnError)
	s := bindSettings(fs, groupConnection, connectionKeys...)
	if err := fs.Parse(args); err != nil {
		t.Fatalf("flags %v: %v", args, err)
	}
	c, err := s.load()
	if err != nil {
		t.Fatalf("flags %v: %v", args, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	nc, _, err := connect(ctx, c, "ops-test", zerolog.Nop())
	if err == nil {
		t.Cleanup(nc.Close)
	}
	return nc, err
}

func initAuth(t *testing.T, routes []string) *auth.Store {
	t.Helper()
	store, err := auth.Init(auth.InitOptions{DataDir: t.TempDir(), Tenants: []string{"a"}, WorkerIDs: []string{"w1"},
		BcryptCost: 4, Routes: routes})
	if err != nil {
		t.Fatal(err)
	}
	return store
}

// standalone.conf with its tls block and the generated users serves the CLI
// over TLS with --nats-ca and a credential, enforces the generated grants, and
// refuses a client that does not trust the certificate, one without TLS, and a
// wrong password.
//
// Mutation caught: commenting out `include "nats-auth.conf"` in
// ops/nats/standalone.conf (0 users); auth/natsconf.go writeUser not writing a
// user's permissions block (b's replies readable).
func TestOpsStandaloneConfServesAuthenticatedTLS(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	store := initAuth(t, nil)
	caFile := makeCerts(t, dir)
	opts := loadOps(t, deployOps(t, "standalone.conf", dir, dir, t.TempDir(), store, 1), store)
	srv := runServer(t, opts)
	port := srv.Addr().(*net.TCPAddr).Port
	tlsURL := fmt.Sprintf("tls://127.0.0.1:%d", port)

	admin, err := store.Credential(auth.RoleAdmin, "")
	if err != nil {
		t.Fatal(err)
	}
	nc, err := cliConnect(t, 10*time.Second, "--nats", tlsURL, "--nats-ca", caFile,
		"--nats-user", admin.User, "--nats-password", admin.Password)
	if err != nil {
		t.Fatalf("connect over TLS with the CA and the admin credential: %v", err)
	}
	if _, err := nc.TLSConnectionState(); err != nil {
		t.Fatalf("connection is not TLS: %v", err)
	}
	// JetStream of the ops file works through it: provision as the admin.
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := jsprov.Provision(ctx, js, jsprov.Options{}); err != nil {
		t.Fatalf("provision over TLS: %v", err)
	}

	prod, err := store.Credential(auth.RoleProducer, "a")
	if err != nil {
		t.Fatal(err)
	}
	pc, err := cliConnect(t, 10*time.Second, "--nats", tlsURL, "--nats-ca", caFile,
		"--nats-user", prod.User, "--nats-password", prod.Password)
	if err != nil {
		t.Fatalf("producer over TLS: %v", err)
	}
	// The generated grants hold on this server: tenant a's producer reads its own
	// replies, not tenant b's (the server answers a refused subscription with a
	// permissions violation before the flush's PONG).
	for _, sc := range []struct {
		subject string
		refused bool
	}{{subjects.ReplyNamespace("a"), false}, {subjects.ReplyNamespace("b"), true}} {
		if _, err := pc.SubscribeSync(sc.subject); err != nil {
			t.Fatal(err)
		}
		if err := pc.Flush(); err != nil {
			t.Fatal(err)
		}
		le := pc.LastError()
		if refused := le != nil && strings.Contains(strings.ToLower(le.Error()), "permissions violation"); refused != sc.refused {
			t.Fatalf("producer a subscribing to %s: last error %v, want refused=%v", sc.subject, le, sc.refused)
		}
	}
	if _, err := cliConnect(t, 10*time.Second, "--nats", tlsURL, "--nats-ca", caFile,
		"--nats-user", prod.User, "--nats-password", "wrong"); !errors.Is(err, nats.ErrAuthorization) {
		t.Fatalf("wrong password: %v, want an authorization error", err)
	}
	// Retried until the deadline: an untrusted certificate is not a permanent error.
	_, err = cliConnect(t, 5*time.Second, "--nats", tlsURL, "--nats-user", prod.User, "--nats-password", prod.Password)
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("without the CA: %v, want the certificate refused", err)
	}
	// A nats:// URL without the CA is no way around it: the server requires TLS.
	_, err = cliConnect(t, 5*time.Second, "--nats", fmt.Sprintf("nats://127.0.0.1:%d", port),
		"--nats-user", prod.User, "--nats-password", prod.Password)
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("nats:// without the CA: %v, want the certificate refused", err)
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startOpsCluster deploys nats-{1,2,3}.conf under dir, routed on three free
// loopback ports, and starts them; nil servers when one of them does not
// become ready (a port taken since it was picked), the others shut down.
func startOpsCluster(t *testing.T, dir, certDir string) ([]*server.Server, *auth.Store) {
	t.Helper()
	ports := []int{freePort(t), freePort(t), freePort(t)}
	var routes []string
	for _, p := range ports {
		routes = append(routes, fmt.Sprintf("127.0.0.1:%d", p))
	}
	store := initAuth(t, routes)
	var srvs []*server.Server
	for i, port := range ports {
		name := fmt.Sprintf("nats-%d.conf", i+1)
		sdir := filepath.Join(dir, fmt.Sprintf("nats-%d", i+1))
		if err := os.MkdirAll(sdir, 0o700); err != nil {
			t.Fatal(err)
		}
		opts := loadOps(t, deployOps(t, name, sdir, certDir, filepath.Join(sdir, "store"), store, 2), store)
		if opts.Cluster.Username != auth.RouteUser || opts.Cluster.TLSConfig == nil || len(opts.Routes) != len(ports) {
			t.Fatalf("%s: cluster user %q, TLS %v, %d routes; want the generated route credentials, TLS and %d routes",
				name, opts.Cluster.Username, opts.Cluster.TLSConfig != nil, len(opts.Routes), len(ports))
		}
		// Routes are what this test is about; three JetStream servers would only
		// add raft traffic on a shared machine.
		opts.JetStream = false
		opts.Cluster.Host, opts.Cluster.Port = "127.0.0.1", port
		srv, err := server.NewServer(opts)
		if err != nil {
			t.Fatal(err)
		}
		go srv.Start()
		t.Cleanup(srv.Shutdown)
		srvs = append(srvs, srv)
		if !srv.ReadyForConnections(20 * time.Second) {
			t.Logf("%s not ready on route port %d; retrying on fresh ports", name, port)
			for _, s := range srvs {
				s.Shutdown()
			}
			return nil, nil
		}
	}
	return srvs, store
}

// nats-{1,2,3}.conf with the generated includes and their tls blocks form a
// cluster: the routes authenticate with the generated route credentials over
// TLS.
func TestOpsClusterConfsRouteWithGeneratedCredentials(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	caFile := makeCerts(t, dir)
	var srvs []*server.Server
	var store *auth.Store
	// The route ports are picked free and released before the servers listen on
	// them, so another test's connection may take one in between (seen in CI:
	// the server never becomes ready). Such a cluster is stopped and started
	// again on fresh ports.
	for attempt := 1; srvs == nil; attempt++ {
		if attempt > 3 {
			t.Fatal("nats-server not ready on three sets of free route ports")
		}
		srvs, store = startOpsCluster(t, filepath.Join(dir, fmt.Sprint(attempt)), dir)
	}
	deadline := time.Now().Add(20 * time.Second)
	for i, srv := range srvs {
		for {
			rz, err := srv.Routez(nil)
			if err != nil {
				t.Fatal(err)
			}
			peers := map[string]bool{}
			for _, r := range rz.Routes {
				peers[r.RemoteName] = true
			}
			if len(peers) == len(srvs)-1 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("nats-%d routes to %v, want the other %d servers", i+1, peers, len(srvs)-1)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// A client of one server reaches a subscriber on another, over TLS.
	admin, err := store.Credential(auth.RoleAdmin, "")
	if err != nil {
		t.Fatal(err)
	}
	url := func(s *server.Server) string {
		return fmt.Sprintf("tls://127.0.0.1:%d", s.Addr().(*net.TCPAddr).Port)
	}
	sub, err := cliConnect(t, 10*time.Second, "--nats", url(srvs[0]), "--nats-ca", caFile,
		"--nats-user", admin.User, "--nats-password", admin.Password)
	if err != nil {
		t.Fatal(err)
	}
	got, err := sub.SubscribeSync("ops.test")
	if err != nil {
		t.Fatal(err)
	}
	if err := sub.Flush(); err != nil {
		t.Fatal(err)
	}
	pub, err := cliConnect(t, 10*time.Second, "--nats", url(srvs[2]), "--nats-ca", caFile,
		"--nats-user", admin.User, "--nats-password", admin.Password)
	if err != nil {
		t.Fatal(err)
	}
	// Interest crosses the routes asynchronously: publish until it arrives.
	for {
		if err := pub.Publish("ops.test", []byte("hi")); err != nil {
			t.Fatal(err)
		}
		if _, err := got.NextMsg(200 * time.Millisecond); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a message published on nats-3 never reached nats-1's subscriber")
		}
	}
}
