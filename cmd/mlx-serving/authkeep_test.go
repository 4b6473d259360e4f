package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// `auth init --keep-passwords --workers w1,w2` adds w2 and retires nobody:
// the flags not given are the store's lists, not their defaults (the second
// pass of round 20: the default tenant "default" replaced tenants a and b).
// Naming the tenants then retires the one left out, and says so.
// Mutation caught: authInit passing the flags' defaults with
// --keep-passwords (producer-a retired, producer-default made): red.
func TestAuthInitKeepPasswordsKeepsUnnamedLists(t *testing.T) {
	t.Parallel()
	d := t.TempDir()
	exists := func(name string) bool {
		_, err := os.Stat(filepath.Join(d, "auth", name))
		return err == nil
	}
	if code, _, stderr := runReal(t, "auth", "init", "--data-dir", d, "--tenants", "a,b", "--workers", "w1"); code != 0 {
		t.Fatalf("init: exit %d: %s", code, stderr)
	}
	code, stdout, stderr := runReal(t, "auth", "init", "--data-dir", d, "--keep-passwords", "--workers", "w1,w2")
	if code != 0 {
		t.Fatalf("keep: exit %d: %s", code, stderr)
	}
	if !exists("producer-a.json") || !exists("producer-b.json") || exists("producer-default.json") || !exists("worker-w2.json") {
		t.Fatalf("after adding w2 the producers are not a and b, or w2 has no credential:\n%s", stdout)
	}
	if strings.Contains(stdout, "Retired") {
		t.Fatalf("adding a worker retired someone:\n%s", stdout)
	}
	code, stdout, stderr = runReal(t, "auth", "init", "--data-dir", d, "--keep-passwords", "--tenants", "a")
	if code != 0 || exists("producer-b.json") || !strings.Contains(stdout, "Retired") || !strings.Contains(stdout, "producer-b") {
		t.Fatalf("retiring tenant b: exit %d, stdout\n%s\nstderr %s", code, stdout, stderr)
	}
}

// --force with --keep-passwords is refused: together they silently kept every
// password, so an operator rotating after a leak got exit 0 and no rotation
// (round 20's final review).
// Mutation caught: the flags not marked mutually exclusive: red.
func TestAuthInitRefusesForceWithKeepPasswords(t *testing.T) {
	t.Parallel()
	d := t.TempDir()
	if code, _, stderr := runReal(t, "auth", "init", "--data-dir", d, "--tenants", "a", "--workers", "w1"); code != 0 {
		t.Fatalf("init: exit %d: %s", code, stderr)
	}
	before, err := os.ReadFile(filepath.Join(d, "auth", "admin.json"))
	if err != nil {
		t.Fatal(err)
	}
	code, _, stderr := runReal(t, "auth", "init", "--data-dir", d, "--force", "--keep-passwords")
	if code != exitUsage || !strings.Contains(stderr, "force") {
		t.Fatalf("exit %d, stderr %q; want %d naming the flags", code, stderr, exitUsage)
	}
	after, err := os.ReadFile(filepath.Join(d, "auth", "admin.json"))
	if err != nil || string(after) != string(before) {
		t.Fatalf("admin.json changed or unreadable (%v)", err)
	}
}
