package bench

import (
	"os"
	"testing"
)

// The command name in /proc/PID/stat may hold spaces and parentheses; fields
// are counted from the last ')'.
// Mutation caught: counting from the first ')' (strings.IndexByte) misreads
// ppid and the ticks of a process named "a) b".
func TestParseStat(t *testing.T) {
	t.Parallel()
	line := "4242 (mlx (x) b) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 9 0 123 456 789"
	ppid, ticks, ok := parseStat(line)
	if !ok || ppid != 17 || ticks != 281 {
		t.Fatalf("parseStat: ppid %d ticks %d ok %v, want 17, 281 (250 user + 31 system)", ppid, ticks, ok)
	}
	if _, _, ok := parseStat("4242 (short) S 1 2"); ok {
		t.Fatal("a truncated line parsed")
	}
}

// The bench's own process is in its tree, and a level's CPU is the difference
// of two readings by process name.
func TestTreeCPUAndDelta(t *testing.T) {
	t.Parallel()
	self := os.Getpid()
	tree := treeCPU(self)
	if _, err := os.Stat("/proc/self/stat"); err == nil {
		if _, ok := tree[self]; !ok {
			t.Fatalf("own pid %d missing from its tree %v", self, tree)
		}
	}
	before := map[int]procCPU{1: {Name: "w", Ticks: 100}, 2: {Name: "d", Ticks: 50}}
	after := map[int]procCPU{1: {Name: "w", Ticks: 150}, 2: {Name: "d", Ticks: 50}, 3: {Name: "w", Ticks: 20}}
	d := cpuDelta(before, after)
	if d["w"] != 0.7 || d["d"] != 0 {
		t.Fatalf("delta %v, want w 0.7 s (50+20 ticks), d 0", d)
	}
}
