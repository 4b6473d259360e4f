package bus

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
)

// ConnectOptions configures a client connection to the bus.
type ConnectOptions struct {
	// URLs of the servers; several for a cluster. Default nats://127.0.0.1:4222.
	URLs []string
	// Name identifies the connection in server monitoring, e.g. "worker-mac1".
	Name string
	// User/Password or Token authenticate with static credentials.
	User, Password, Token string
	// CredsFile (JWT + seed) or NKeySeedFile authenticate with decentralised auth.
	CredsFile, NKeySeedFile string
	// TLS, when set, is used as is. Otherwise CAFile and CertFile/KeyFile, when
	// set, build the TLS configuration.
	TLS                       *tls.Config
	CAFile, CertFile, KeyFile string
	// InboxPrefix replaces "_INBOX" for the connection's reply subjects (publish
	// acks, API answers, request replies). Default: "_INBOX.<User>" when User is
	// one subject token, else "_INBOX". A user restricted to subscribing to its
	// own inbox (package auth) thus works without configuration, and a server
	// that grants _INBOX.> sees no difference.
	InboxPrefix string
	// Logger receives connection events. The zero value discards them.
	Logger zerolog.Logger
	// MaxReconnects bounds reconnect attempts after a connection is lost; 0 or less
	// means forever, the right default for long-running services.
	MaxReconnects int
	// ReconnectWait is the pause between reconnect attempts; default 1s.
	ReconnectWait time.Duration
	// DialTimeout bounds one connection attempt; default 2s.
	DialTimeout time.Duration
	// OnClosed, if set, is called once the connection is closed for good:
	// by Close, or by the client giving up on it (MaxReconnects spent, or
	// the server refusing the credentials twice while reconnecting, which
	// nats.go takes as final). err is the last error, nil after Close.
	OnClosed func(err error)
}

// Connect opens a connection to the bus. A failed first connection is retried with
// backoff until ctx is done, so services can start before the bus does. Once
// connected, a lost connection is re-established in the background forever unless
// MaxReconnects says otherwise; disconnects, reconnects and async errors are logged.
func Connect(ctx context.Context, opts ConnectOptions) (*nats.Conn, error) {
	urls := opts.URLs
	if len(urls) == 0 {
		urls = []string{nats.DefaultURL}
	}
	log := opts.Logger
	maxReconnects := opts.MaxReconnects
	if maxReconnects <= 0 {
		maxReconnects = -1
	}
	reconnectWait := opts.ReconnectWait
	if reconnectWait <= 0 {
		reconnectWait = time.Second
	}
	dialTimeout := opts.DialTimeout
	if dialTimeout <= 0 {
		dialTimeout = 2 * time.Second
	}

	nopts := []nats.Option{
		nats.MaxReconnects(maxReconnects),
		nats.ReconnectWait(reconnectWait),
		// A connection whose path froze (connected, delivering nothing) is
		// noticed after MaxPingsOut unanswered pings and made again: with
		// nats.go's defaults (2 min, 2) that took 4 minutes, in which a
		// dispatcher placed nothing (its ticks count as deaf meanwhile:
		// dispatcher/hearing.go) and a worker's records went unanswered.
		nats.PingInterval(5 * time.Second),
		nats.MaxPingsOutstanding(3),
		nats.DisconnectErrHandler(func(nc *nats.Conn, err error) {
			ev := log.Warn()
			if err != nil {
				ev = ev.Err(err)
			}
			ev.Msg("nats disconnected")
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info().Str("url", nc.ConnectedUrlRedacted()).Msg("nats reconnected")
		}),
		nats.ClosedHandler(func(nc *nats.Conn) {
			ev := log.Info()
			err := nc.LastError()
			if err != nil {
				ev = log.Warn().Err(err)
			}
			ev.Msg("nats connection closed")
			if opts.OnClosed != nil {
				opts.OnClosed(err)
			}
		}),
		nats.ErrorHandler(func(nc *nats.Conn, sub *nats.Subscription, err error) {
			ev := log.Error().Err(err)
			if sub != nil {
				ev = ev.Str("subject", sub.Subject)
			}
			ev.Msg("nats async error")
		}),
	}
	if opts.Name != "" {
		nopts = append(nopts, nats.Name(opts.Name))
	}
	if opts.User != "" || opts.Password != "" {
		nopts = append(nopts, nats.UserInfo(opts.User, opts.Password))
	}
	inbox := opts.InboxPrefix
	if inbox == "" && isSubjectToken(opts.User) {
		inbox = "_INBOX." + opts.User
	}
	if inbox != "" {
		nopts = append(nopts, nats.CustomInboxPrefix(inbox))
	}
	if opts.Token != "" {
		nopts = append(nopts, nats.Token(opts.Token))
	}
	if opts.CredsFile != "" {
		nopts = append(nopts, nats.UserCredentials(opts.CredsFile))
	}
	if opts.NKeySeedFile != "" {
		o, err := nats.NkeyOptionFromSeed(opts.NKeySeedFile)
		if err != nil {
			return nil, fmt.Errorf("bus: nkey seed: %w", err)
		}
		nopts = append(nopts, o)
	}
	switch {
	case opts.TLS != nil:
		nopts = append(nopts, nats.Secure(opts.TLS))
	default:
		if opts.CAFile != "" {
			nopts = append(nopts, nats.RootCAs(opts.CAFile))
		}
		if opts.CertFile != "" || opts.KeyFile != "" {
			nopts = append(nopts, nats.ClientCert(opts.CertFile, opts.KeyFile))
		}
	}

	url := strings.Join(urls, ",")
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 100 * time.Millisecond
	bo.MaxInterval = 2 * time.Second
	bo.MaxElapsedTime = 0 // ctx bounds the retries
	bo.Reset()
	for attempt := 1; ; attempt++ {
		timeout := dialTimeout
		if dl, ok := ctx.Deadline(); ok {
			if left := time.Until(dl); left < timeout {
				timeout = left
			}
		}
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("bus: connect %s: %w", url, err)
		}
		nc, err := nats.Connect(url, append(nopts, nats.Timeout(timeout))...)
		if err == nil {
			log.Info().Str("url", nc.ConnectedUrlRedacted()).Int("attempts", attempt).Msg("nats connected")
			return nc, nil
		}
		if isPermanentConnectError(err) {
			return nil, fmt.Errorf("bus: connect %s: %w", url, err)
		}
		wait := bo.NextBackOff()
		log.Warn().Err(err).Int("attempt", attempt).Dur("retry_in", wait).Msg("nats connect failed")
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("bus: connect %s: %w (last error: %v)", url, ctx.Err(), err)
		case <-t.C:
		}
	}
}

// isPermanentConnectError reports failures that retrying cannot fix.
func isPermanentConnectError(err error) bool {
	return errors.Is(err, nats.ErrAuthorization) || errors.Is(err, nats.ErrAuthExpired) ||
		errors.Is(err, nats.ErrAuthRevoked) || errors.Is(err, nats.ErrAccountAuthExpired) ||
		errors.Is(err, nats.ErrNoUserCB) || errors.Is(err, nats.ErrSecureConnRequired) ||
		errors.Is(err, nats.ErrSecureConnWanted)
}

// isSubjectToken reports whether s can be one token of a subject: no dots, no
// wildcards, no white space.
func isSubjectToken(s string) bool {
	if s == "" || len(s) > 128 {
		return false
	}
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_':
		default:
			return false
		}
	}
	return true
}

// NewJetStream is jetstream.New for nc, under the JetStream API prefix of
// nc's user's account (subjects.APIPrefixForUser): a producer, worker or
// gateway credential of auth init lives in an account of its own, whose
// JetStream calls and KV writes are imported under a prefix.
func NewJetStream(nc *nats.Conn, opts ...jetstream.JetStreamOpt) (jetstream.JetStream, error) {
	if p := subjects.APIPrefixForUser(nc.Opts.User); p != "" {
		return jetstream.NewWithAPIPrefix(nc, p, opts...)
	}
	return jetstream.New(nc, opts...)
}
