// Package natsserver runs an embedded NATS server with JetStream on a file
// store: the bus of `mlx-serving up` and of the tests. A fleet runs a standalone
// NATS cluster instead (ops/nats).
package natsserver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/rs/zerolog"
)

// Options configures an embedded NATS server with JetStream on disk.
type Options struct {
	// Host to listen on; default 127.0.0.1 (an embedded bus is local unless asked).
	Host string
	// Port to listen on: 0 means the NATS default 4222, -1 a random free port.
	Port int
	// StoreDir is the JetStream file store directory; required, since queued jobs
	// must survive a restart of the process.
	StoreDir string
	// SyncAlways fsyncs every write before the publish is acknowledged (the server's
	// sync_interval: always). Without it the file store fsyncs every SyncInterval
	// and a power loss can drop acknowledged jobs; a process kill cannot.
	SyncAlways bool
	// SyncInterval is the background fsync period when SyncAlways is off; 0 keeps
	// the server default (2 minutes).
	SyncInterval time.Duration
	// ServerName names the server in logs and, later, in a cluster.
	ServerName string
	// Logger receives the server's logs. The zero value discards them.
	Logger zerolog.Logger
	// Debug and Trace turn on the server's debug and protocol-trace logs. Trace logs
	// every protocol message: only for chasing a bug.
	Debug, Trace bool
	// MaxPayload caps a message's size; 0 keeps the server default (1 MiB).
	MaxPayload int32
	// JetStreamMaxStore caps the file store in bytes; 0 lets the server size it
	// from the free disk space.
	JetStreamMaxStore int64
	// ReadyTimeout bounds the wait for the server to accept clients when ctx has no
	// deadline; default 30s.
	ReadyTimeout time.Duration

	// AuthConf, when set, is the nats-server configuration file of the bus's
	// accounts and users (auth init's nats-auth.conf, package auth): the
	// server then accepts only those users, each in its account and limited to
	// its permissions. Empty means no authentication (one account).
	AuthConf string
	// Account is the account AuthConf keeps JetStream in ("" without
	// AuthConf: the global account). StoreAccounts lists the others the data
	// dir may have been used under (the global account always is one): when
	// Account has no streams and exactly one of them has, Start moves that
	// one's to Account; with streams in both, Start refuses
	// (ErrStoreInTwoAccounts). See moveAccountStore.
	Account       string
	StoreAccounts []string
	// TLS, when set, makes the server require TLS from every client; a config
	// with ClientCAs and ClientAuth also verifies client certificates.
	TLS *tls.Config

	// Cluster routes and accounts are added here when `mlx-serving up` grows past
	// a single node; a fleet runs a standalone NATS cluster (ops/).
}

// Server is an embedded NATS server with JetStream.
type Server struct {
	ns   *server.Server
	log  zerolog.Logger
	once sync.Once
	lock *os.File // the store directory's lock, released after the stores close
	// failed gets the first critical write error (StoreFailed).
	failed chan string
}

// Start starts an embedded NATS server with JetStream on a file store and
// returns once it accepts clients. It installs no signal handlers: the embedding
// process owns its signals and calls Shutdown.
func Start(ctx context.Context, opts Options) (*Server, error) {
	if opts.StoreDir == "" {
		return nil, errors.New("bus: natsserver.Options.StoreDir is required")
	}
	lock, err := lockStore(opts.StoreDir)
	if err != nil {
		return nil, err
	}
	started := false
	defer func() {
		if !started {
			// The server is down (every failure below shuts it down first):
			// streams it deleted for not loading are put back (preload.go).
			if err := restoreKept(opts.StoreDir, nil); err != nil {
				opts.Logger.Error().Err(err).Str("kept", filepath.Join(opts.StoreDir, keepDir)).Msg("putting back the streams kept while starting failed; they are there")
			}
			_ = lock.Close()
		}
	}()
	// Streams a start that died half-way left only in keepDir go back first,
	// under the account they were kept from: moving the account's store
	// before that put them back beside the moved ones, in two accounts, and
	// up refused every start after (red team round 23, the upgrade's F1).
	if err := restoreKept(opts.StoreDir, nil); err != nil {
		return nil, err
	}
	if err := moveAccountStore(opts.StoreDir, opts.Account, opts.StoreAccounts, opts.Logger); err != nil {
		return nil, err
	}
	kept, err := keepStreams(opts.StoreDir)
	switch {
	case err != nil && linksUnsupported(err):
		opts.Logger.Warn().Err(err).Msg("the store's file system takes no hard links: starting without the streams linked aside; a stream that does not load is deleted by the server, unprotected")
		kept = nil
	case err != nil:
		return nil, fmt.Errorf("%w (%w): starting without them would let a stream that does not load be deleted with its jobs — free space on the store's disk (df) or descriptors (ulimit -n), then start again", ErrCannotKeepStreams, err)
	}
	host := opts.Host
	if host == "" {
		host = "127.0.0.1"
	}
	sopts := &server.Options{}
	if opts.AuthConf != "" {
		// The same file a standalone server includes: one source for both.
		fo, err := server.ProcessConfigFile(opts.AuthConf)
		if err != nil {
			return nil, fmt.Errorf("bus: nats auth configuration %s: %w", opts.AuthConf, err)
		}
		sopts = fo
	}
	sopts.ServerName = opts.ServerName
	sopts.Host, sopts.Port = host, opts.Port
	sopts.NoSigs, sopts.JetStream = true, true
	sopts.StoreDir = opts.StoreDir
	sopts.SyncAlways, sopts.SyncInterval = opts.SyncAlways, opts.SyncInterval
	// Set here only when given: a limit the auth conf file sets (its
	// jetstream block's max_file_store, say) is kept, not zeroed.
	if opts.MaxPayload != 0 {
		sopts.MaxPayload = opts.MaxPayload
	}
	if opts.JetStreamMaxStore != 0 {
		sopts.JetStreamMaxStore = opts.JetStreamMaxStore
	}
	sopts.Debug, sopts.Trace = opts.Debug, opts.Trace
	if opts.TLS != nil {
		sopts.TLSConfig = opts.TLS
		sopts.TLS = true
		sopts.TLSVerify = opts.TLS.ClientAuth == tls.RequireAndVerifyClientCert
		sopts.TLSTimeout = 2
	}
	ns, err := server.NewServer(sopts)
	if err != nil {
		return nil, fmt.Errorf("bus: new nats server: %w", err)
	}
	failed := make(chan string, 1)
	adapter := &serverLogger{log: opts.Logger.With().Str("component", "nats-server").Logger(), failed: failed}
	ns.SetLogger(adapter, opts.Debug, opts.Trace)

	s := &Server{ns: ns, log: opts.Logger, lock: lock, failed: failed}
	// Start returns once JetStream is enabled and the accept loop runs; failures are
	// reported through Fatalf, which our logger records instead of exiting.
	ns.Start()

	timeout := opts.ReadyTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	readyCtx := ctx
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		readyCtx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	for !ns.ReadyForConnections(50 * time.Millisecond) {
		if msg := adapter.fatal(); msg != "" {
			s.shutdownNow()
			return nil, fmt.Errorf("bus: nats server failed to start: %s", msg)
		}
		if err := readyCtx.Err(); err != nil {
			s.shutdownNow()
			return nil, fmt.Errorf("bus: nats server not ready: %w", err)
		}
	}
	if msg := adapter.fatal(); msg != "" {
		s.shutdownNow()
		return nil, fmt.Errorf("bus: nats server failed to start: %s", msg)
	}
	if !ns.JetStreamEnabled() {
		s.shutdownNow()
		return nil, errors.New("bus: nats server started without JetStream")
	}
	missing, err := notLoaded(ns, kept)
	if err == nil && len(missing) > 0 {
		err = fmt.Errorf("%w: %v under %s (the server's log says why, e.g. \"Error recreating stream\"); their files are put back — fix the cause (disk, permissions, a file in the way) or move them aside, then start again; starting would have let provisioning replace them with empty streams. Do not start an older release on this store meanwhile: one from before this check (commit 23affe6) deletes such a stream",
			ErrStreamNotLoaded, missing, filepath.Join(opts.StoreDir, "jetstream"))
	}
	if err != nil {
		s.shutdownNow()
		return nil, err
	}
	_ = os.RemoveAll(filepath.Join(opts.StoreDir, keepDir)) // every stream loaded: the links go
	opts.Logger.Info().Str("url", ns.ClientURL()).Str("store_dir", opts.StoreDir).
		Bool("sync_always", opts.SyncAlways).Bool("auth", opts.AuthConf != "").Bool("tls", opts.TLS != nil).
		Msg("embedded nats server ready")
	started = true
	return s, nil
}

// StoreFailed delivers the first critical write error of a stream or
// consumer (the server's log line). nats-server keeps such an error until it
// restarts, refusing every write to that stream meanwhile (a block file it
// could not open: a full disk, no descriptors left — red team round 22, F1),
// and says so only in its log, so the embedding process is told here and can
// stop for its supervisor to start it again (up does).
func (s *Server) StoreFailed() <-chan string { return s.failed }

// ClientURL is the URL clients connect to, e.g. nats://127.0.0.1:40123.
func (s *Server) ClientURL() string { return s.ns.ClientURL() }

// NATSServer exposes the underlying server for inspection (config, monitoring).
func (s *Server) NATSServer() *server.Server { return s.ns }

// Shutdown stops the server and waits until it has flushed and closed its stores,
// or until ctx is done. Calling it again is harmless.
func (s *Server) Shutdown(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		s.shutdownNow()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("bus: nats server shutdown: %w", ctx.Err())
	}
}

func (s *Server) shutdownNow() {
	s.once.Do(func() {
		s.ns.Shutdown()
		s.ns.WaitForShutdown()
		// Only once the stores are closed may another server open them.
		_ = s.lock.Close()
	})
	// A second caller must also wait for the first shutdown to complete.
	s.ns.WaitForShutdown()
}

// serverLogger routes nats-server logs through zerolog. Fatalf does not exit: an
// embedding process decides for itself, and Start reports the failure.
type serverLogger struct {
	log      zerolog.Logger
	failed   chan<- string // StoreFailed's; the first critical write error only
	mu       sync.Mutex
	fatalMsg string
}

var _ server.Logger = (*serverLogger)(nil)

func (l *serverLogger) Noticef(format string, v ...any) { l.log.Info().Msgf(format, v...) }
func (l *serverLogger) Warnf(format string, v ...any)   { l.log.Warn().Msgf(format, v...) }
func (l *serverLogger) Errorf(format string, v ...any) {
	msg := fmt.Sprintf(format, v...)
	l.log.Error().Msg(msg)
	// The server's only signal of a stream or consumer that refuses writes
	// until it restarts (stream.go setWriteErrLocked, and the consumer's and
	// meta group's alike); matched on the format, not the arguments.
	if strings.Contains(format, "critical write error") {
		select {
		case l.failed <- msg:
		default:
		}
	}
}
func (l *serverLogger) Debugf(format string, v ...any) { l.log.Debug().Msgf(format, v...) }
func (l *serverLogger) Tracef(format string, v ...any) { l.log.Trace().Msgf(format, v...) }

func (l *serverLogger) Fatalf(format string, v ...any) {
	msg := fmt.Sprintf(format, v...)
	l.log.Error().Bool("fatal", true).Msg(msg)
	l.mu.Lock()
	if l.fatalMsg == "" {
		l.fatalMsg = msg
	}
	l.mu.Unlock()
}

func (l *serverLogger) fatal() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.fatalMsg
}
