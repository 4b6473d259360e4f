package natsserver

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/rs/zerolog"
)

// globalAccount is the account every user is in when the server has no
// accounts configured; nats-server keeps its JetStream data under this name.
const globalAccount = "$G"

// ErrStoreInTwoAccounts is returned by Start when the store holds streams
// under more than one of the accounts it may have been used with: which of
// them is the fleet's is the operator's call.
var ErrStoreInTwoAccounts = errors.New("bus: the JetStream store holds streams under more than one account")

// moveAccountStore makes the streams of the store at storeDir those of
// account use ("" = the global account): when use has none and exactly one
// other of accounts (the global account always among them) has some, that
// account's directory is renamed to use's. Called with the store locked and
// before the server opens it.
//
// Why: nats-server keeps an account's JetStream data in
// <store>/jetstream/<account>. Turning accounts on (auth init on a data dir
// used without them, or an upgrade from a release that kept every user in the
// global account) put JetStream in another account, which found no streams
// and made new empty ones: every queued job, record and dead letter was left
// unseen, with no warning (red team round 19, opstore F1). The reverse,
// accounts turned off, did the same.
func moveAccountStore(storeDir, use string, accounts []string, log zerolog.Logger) error {
	if use == "" {
		use = globalAccount
	}
	root := filepath.Join(storeDir, "jetstream")
	var others []string
	for _, a := range append([]string{globalAccount}, accounts...) {
		if a != use && !slices.Contains(others, a) && hasStreams(filepath.Join(root, a)) {
			others = append(others, a)
		}
	}
	switch {
	case len(others) == 0:
		return nil
	case hasStreams(filepath.Join(root, use)) || len(others) > 1:
		return fmt.Errorf("%w: %s and %v under %s; keep the directory of the one the fleet runs under (%s now) and move the other away",
			ErrStoreInTwoAccounts, use, others, root, use)
	}
	from, to := filepath.Join(root, others[0]), filepath.Join(root, use)
	// An empty directory of use's (no streams) is in the way of the rename.
	if err := os.RemoveAll(to); err != nil {
		return fmt.Errorf("bus: clear %s: %w", to, err)
	}
	if err := os.Rename(from, to); err != nil {
		return fmt.Errorf("bus: move the JetStream data of account %s to %s: %w", others[0], use, err)
	}
	log.Warn().Str("from", from).Str("to", to).
		Msg("the store's streams were under another account (accounts turned on or off for this data dir); moved to the account in use")
	return nil
}

// hasStreams reports whether an account directory of a JetStream store holds
// at least one stream.
func hasStreams(accountDir string) bool {
	entries, err := os.ReadDir(filepath.Join(accountDir, "streams"))
	return err == nil && len(entries) > 0
}
