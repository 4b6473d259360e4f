package natsserver_test

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

// keepPath is the directory Start links the streams into while it starts.
func keepPath(dir string) string { return filepath.Join(dir, "streams-kept-while-starting") }

// storeWithJobs makes a store at dir, without accounts, whose JOBS holds n
// messages, and stops its server.
func storeWithJobs(t *testing.T, dir string, n int) {
	t.Helper()
	srv, js, err := startIn(t, dir, "")
	if err != nil {
		t.Fatal(err)
	}
	putJobs(t, js, n)
	if err := srv.Shutdown(testenv.Context(t, 20*time.Second)); err != nil {
		t.Fatal(err)
	}
}

// When the streams cannot be linked aside for a reason other than a file
// system without links (a full disk: here a file where the directory goes),
// Start refuses: going on unprotected, a stream that then did not load was
// emptied — 30 of 30 accepted jobs lost on a full disk (red team round 23,
// the operator's F1).
// Mutation caught: Start going on unprotected after any keepStreams error.
func TestStartRefusesWhenTheStreamsCannotBeKept(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	storeWithJobs(t, dir, 3)
	if err := os.WriteFile(keepPath(dir), []byte("in the way"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := startIn(t, dir, ""); !errors.Is(err, natsserver.ErrCannotKeepStreams) {
		t.Fatalf("Start unable to link the streams aside: %v, want ErrCannotKeepStreams", err)
	}
	if err := os.Remove(keepPath(dir)); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err) // (the refusal may have cleared it itself)
	}
	_, js, err := startIn(t, dir, "")
	if err != nil {
		t.Fatal(err)
	}
	if n := jobsHeld(t, js); n != 3 {
		t.Fatalf("JOBS holds %d once the cause is gone, want 3", n)
	}
}

// Stream directories the server never loads — one it was deleting when it
// was killed (".NAME") and one created without its metafiles yet — are not
// kept, so they do not fail every start as streams that did not load (red
// team round 23, the operator's F2 and F3).
// Mutation caught: loadable always true: Start fails ErrStreamNotLoaded.
func TestStartKeepsOnlyStreamsTheServerLoads(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	storeWithJobs(t, dir, 2)
	streams := filepath.Join(dir, "jetstream", "$G", "streams")
	for _, d := range []string{".GONE/msgs", "NEW/msgs", "NEW/obs"} {
		if err := os.MkdirAll(filepath.Join(streams, d), 0o750); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(streams, ".GONE", "msgs", "1.blk"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, js, err := startIn(t, dir, "")
	if err != nil {
		t.Fatalf("Start with a half-deleted and a half-created stream directory: %v", err)
	}
	if n := jobsHeld(t, js); n != 2 {
		t.Fatalf("JOBS holds %d, want 2", n)
	}
}

// Links a start killed half-way left are put back before the store moves to
// the account in use, so they cannot land beside the moved streams: turning
// accounts on (auth init) after such a kill made up refuse every start, the
// streams then under two accounts (red team round 23, the upgrade's F1).
// Mutation caught: restoreKept after moveAccountStore: ErrStreamNotLoaded,
// then ErrStoreInTwoAccounts.
func TestKeptLinksGoBackBeforeTheAccountMoves(t *testing.T) {
	t.Parallel()
	dir, conf := t.TempDir(), accountConf(t)
	storeWithJobs(t, dir, 4)
	// What a start killed while its links existed leaves.
	from := filepath.Join(dir, "jetstream", "$G", "streams", "JOBS")
	if err := filepath.WalkDir(from, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, path)
		to := filepath.Join(keepPath(dir), "$G", "JOBS", rel)
		if d.IsDir() {
			return os.MkdirAll(to, 0o700)
		}
		return os.Link(path, to)
	}); err != nil {
		t.Fatal(err)
	}
	srv, js, err := startIn(t, dir, conf)
	if err != nil {
		t.Fatalf("Start with accounts on after a start killed half-way: %v", err)
	}
	if n := jobsHeld(t, js); n != 4 {
		t.Fatalf("JOBS holds %d under MLX, want 4", n)
	}
	if err := srv.Shutdown(testenv.Context(t, 20*time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "jetstream", "$G", "streams")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("streams left under $G after the move: %v", err)
	}
	if _, _, err := startIn(t, dir, conf); err != nil {
		t.Fatalf("the next start: %v", err)
	}
}

// Only a file system without links lets Start go on unprotected.
func TestLinksUnsupportedIsNarrow(t *testing.T) {
	t.Parallel()
	for err, want := range map[error]bool{
		syscall.EXDEV: true, syscall.EPERM: true, syscall.ENOTSUP: true, syscall.EMLINK: true, syscall.ENOSYS: true,
		syscall.ENOSPC: false, syscall.EMFILE: false, syscall.EDQUOT: false, syscall.ENOTDIR: false,
	} {
		if got := natsserver.LinksUnsupported(&os.LinkError{Op: "link", Err: err}); got != want {
			t.Errorf("linksUnsupported(%v) = %v, want %v", err, got, want)
		}
	}
}
