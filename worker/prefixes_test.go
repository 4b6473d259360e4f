package worker

import (
	"encoding/json"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/prefix"
	"github.com/mlx-serving/mlx-serving/schemas"
)

func hashesOf(n int, base uint64) []prefix.Hash {
	out := make([]prefix.Hash, n)
	for i := range out {
		out[i] = prefix.Hash(base + uint64(i))
	}
	return out
}

func advertised(ps []schemas.ModelPrefixes) map[string][]string {
	out := map[string][]string{}
	for _, p := range ps {
		out[p.Model] = p.Hashes
	}
	return out
}

// TestPrefixLog walks the summary's rules one by one. Mutations caught: the
// current-runtime check in summary removed (rows "a restarted runtime",
// "runs of an earlier runtime"); the
// Entries bound removed ("only the last entries runs"); the max_bytes check
// removed ("caching off"); the seq check in observe removed ("a run after the
// stats were asked for").
func TestPrefixLog(t *testing.T) {
	t.Parallel()
	rt1, rt2 := &RuntimeClient{}, &RuntimeClient{}
	h := func(v uint64) string { return prefix.Hash(v).String() }
	tests := []struct {
		name string
		do   func(l *prefixLog)
		cur  *RuntimeClient
		want map[string][]string
	}{
		{"a run is advertised, most recent first, deduplicated", func(l *prefixLog) {
			l.ran(rt1, "m", hashesOf(2, 10))
			l.ran(rt1, "m", hashesOf(2, 11))
			l.ran(rt1, "n", hashesOf(1, 50))
		}, rt1, map[string][]string{"n": {h(50)}, "m": {h(11), h(12), h(10)}}},
		{"no runtime up: nothing", func(l *prefixLog) { l.ran(rt1, "m", hashesOf(1, 1)) }, nil, map[string][]string{}},
		{"a restarted runtime starts empty", func(l *prefixLog) {
			l.ran(rt1, "m", hashesOf(3, 1))
			l.observe(rt2, nil, l.mark())
		}, rt2, map[string][]string{}},
		{"runs of an earlier runtime are not the current one's", func(l *prefixLog) { l.ran(rt1, "m", hashesOf(3, 1)) }, rt2, map[string][]string{}},
		{"an empty cache forgets", func(l *prefixLog) {
			l.ran(rt1, "m", hashesOf(3, 1))
			l.observe(rt1, &schemas.PromptCacheStats{MaxBytes: 1 << 20}, l.mark())
		}, rt1, map[string][]string{}},
		{"a run after the stats were asked for stays", func(l *prefixLog) {
			l.ran(rt1, "m", hashesOf(1, 1))
			asked := l.mark()
			l.ran(rt1, "m", hashesOf(1, 7))
			l.observe(rt1, &schemas.PromptCacheStats{MaxBytes: 1 << 20}, asked)
		}, rt1, map[string][]string{"m": {h(7)}}},
		{"caching off: nothing", func(l *prefixLog) {
			l.ran(rt1, "m", hashesOf(1, 1))
			l.observe(rt1, &schemas.PromptCacheStats{Entries: 4}, 0)
		}, rt1, map[string][]string{}},
		{"only the last entries runs", func(l *prefixLog) {
			l.ran(rt1, "m", hashesOf(1, 1))
			l.ran(rt1, "m", hashesOf(1, 2))
			l.ran(rt1, "m", hashesOf(1, 3))
			l.observe(rt1, &schemas.PromptCacheStats{Entries: 2, MaxBytes: 1 << 20}, l.mark())
		}, rt1, map[string][]string{"m": {h(3), h(2)}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var l prefixLog
			tc.do(&l)
			_, got := l.summary(tc.cur)
			if g := advertised(got); !mapsEqual(g, tc.want) {
				t.Fatalf("advertised %v, want %v", g, tc.want)
			}
		})
	}
}

func mapsEqual(a, b map[string][]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if !slices.Equal(v, b[k]) {
			return false
		}
	}
	return true
}

// TestPrefixLogBounded: whatever runs, the summary holds at most
// schemas.MaxHeartbeatPrefixes hashes and the log at most maxPrefixRuns runs,
// and the heartbeat stays valid. Mutation caught: the total check in summary
// removed.
func TestPrefixLogBounded(t *testing.T) {
	t.Parallel()
	rt := &RuntimeClient{}
	var l prefixLog
	for i := range 3 * maxPrefixRuns {
		l.ran(rt, "m", hashesOf(prefix.MaxBlocks+1, uint64(i)*1000))
	}
	if len(l.runs) != maxPrefixRuns {
		t.Fatalf("log holds %d runs", len(l.runs))
	}
	_, got := l.summary(rt)
	n := 0
	for _, p := range got {
		n += len(p.Hashes)
	}
	if n != schemas.MaxHeartbeatPrefixes {
		t.Fatalf("summary holds %d hashes, want %d", n, schemas.MaxHeartbeatPrefixes)
	}
	now := time.Now().UTC()
	hb := schemas.HeartbeatMsg{WorkerID: "w", Hostname: "h", Platform: "p", Models: []string{"m"}, Slots: 8,
		State: schemas.WorkerReady, StartedAt: now, UpdatedAt: now, Prefixes: got,
		PromptCache: &schemas.PromptCacheStats{Entries: 1, MaxBytes: 1}}
	data, _ := json.Marshal(hb)
	if err := schemas.Validate(schemas.Heartbeat, data); err != nil {
		t.Fatalf("a full heartbeat fails its schema: %v", err)
	}
	if len(data) > 16<<10 {
		t.Fatalf("a full heartbeat is %d bytes", len(data))
	}
}

// TestRunHashes: a completed job advertises its prompt followed by its reply,
// deepest first, and its own prompt's partial last block.
func TestRunHashes(t *testing.T) {
	t.Parallel()
	j := newJob(strings.Repeat("p", 300), 5)
	got := runHashes(&j, "reply")
	after := prefix.AfterReply(&j, "reply")
	own := prefix.OfJob(&j)
	if got[0] != after[len(after)-1] || !slices.Contains(got, own[len(own)-1]) || !slices.Contains(got, own[0]) {
		t.Fatalf("run hashes %v: after %v, own %v", got, after, own)
	}
}

// TestHeartbeatAdvertisesPrefixesOfCompletedJobs: after a job completes the
// worker's heartbeat (schema-checked by waitHeartbeat) names its prefix under
// its model; once the runtime was killed and came back the summary is empty.
// Mutations caught: the prefixRan call in runJob removed (no heartbeat names
// the prefix); the current-runtime checks of summary and observe both removed
// (the restarted worker keeps advertising; either one alone suffices).
func TestHeartbeatAdvertisesPrefixesOfCompletedJobs(t *testing.T) {
	t.Parallel()
	b := startBus(t, 0)
	a := startAgent(t, fakeConfig(t, b, "w-prefix", 0), true)
	ctx := within(t, 60*time.Second)
	j := newJob(strings.Repeat("A shared system prompt. ", 30), 3)
	c := collect(t, b.nc, j.ReplyTo)
	if rep := assign(t, b.nc, a.ID(), batch("tiny", j)); rep.Status != schemas.AssignAccepted {
		t.Fatalf("%+v", rep)
	}
	res := c.untilResult(ctx)
	if res.Status != schemas.StatusCompleted {
		t.Fatalf("%+v", res)
	}
	want := prefix.OfJob(&j)[0].String()
	waitHeartbeat(t, b.kv, a.ID(), 10*time.Second, func(hb *schemas.HeartbeatMsg) bool {
		return slices.Contains(advertised(hb.Prefixes)["tiny"], want)
	})
	pid := a.RuntimePID()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitHeartbeat(t, b.kv, a.ID(), 20*time.Second, func(hb *schemas.HeartbeatMsg) bool {
		return hb.State == schemas.WorkerReady && a.RuntimePID() != pid && a.RuntimePID() != 0 && len(hb.Prefixes) == 0
	})
}
