package dispatcher

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/breaker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/prefix"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go"
)

var sysPrompt = strings.Repeat("You are a careful assistant for the routing tests. ", 20) // 4 blocks

// chatJob is a job of model m: the shared system prompt, then user turns.
func chatJob(id string, turns ...string) *job {
	req := schemas.JobRequest{ID: id, Model: "m", Messages: []schemas.Message{{Role: "system", Content: sysPrompt}}}
	for _, t := range turns {
		req.Messages = append(req.Messages, schemas.Message{Role: "user", Content: t})
	}
	return &job{id: id, req: req, chain: prefix.OfJob(&req)}
}

func hexes(chain []prefix.Hash) []string {
	out := make([]string, len(chain))
	for i, h := range chain {
		out[i] = h.String()
	}
	return out
}

// view is a ready worker of model m with busy of its slots taken and the
// prefixes of holds advertised.
func view(id string, slots, busy int, holds ...*job) *workerView {
	w := &workerView{id: id, br: breaker.New(breaker.Options{Threshold: 3, Consecutive: true, Cooldown: time.Second}), othersReply: -1}
	hb := schemas.HeartbeatMsg{WorkerID: id, Models: []string{"m"}, Slots: slots, InFlight: busy, State: schemas.WorkerReady}
	var hashes []string
	for _, j := range holds {
		hashes = append(hashes, hexes(j.chain)...)
	}
	if len(hashes) > 0 {
		hb.Prefixes = []schemas.ModelPrefixes{{Model: "m", Hashes: hashes}}
	}
	w.observe(hb)
	return w
}

// TestPrefixRouterPick is the routing table. Mutations caught: Pick returning
// the least loaded worker (rows "prefers the warm worker", "the longest
// match wins"); the free-slot check in choose removed ("warm worker full");
// the skew check removed ("beyond the skew bound").
func TestPrefixRouterPick(t *testing.T) {
	t.Parallel()
	conv := chatJob("c1", "first question")
	other := chatJob("o1", "an unrelated question about something else entirely")
	long := chatJob("c2", "first question", strings.Repeat("more context ", 60))
	cold := &job{id: "x", req: schemas.JobRequest{Model: "m", Prompt: "no shared prefix"}}
	cold.chain = prefix.OfJob(&cold.req)
	otherModel := view("w-z", 4, 0)
	otherModel.prefixes = prefixSets([]string{"n"}, []schemas.ModelPrefixes{{Model: "n", Hashes: hexes(conv.chain)}})
	tests := []struct {
		name   string
		skew   float64
		lead   *job
		cands  []*workerView
		want   string
		reason RouteReason
	}{
		{"prefers the warm worker over an idler cold one", 0.5, conv,
			[]*workerView{view("w-a", 4, 0), view("w-b", 4, 1, conv)}, "w-b", RoutePrefixHit},
		{"a later turn goes where the conversation ran", 0.5, long,
			[]*workerView{view("w-a", 4, 0), view("w-b", 4, 1, conv)}, "w-b", RoutePrefixHit},
		{"the longest match wins", 0.5, long,
			[]*workerView{view("w-a", 4, 0, other), view("w-b", 4, 1, long), view("w-c", 4, 0, conv)}, "w-b", RoutePrefixHit},
		{"equal matches: the less loaded", 0.5, conv,
			[]*workerView{view("w-a", 4, 2, conv), view("w-b", 4, 1, conv)}, "w-b", RoutePrefixHit},
		{"warm worker full: least loaded", 0.5, conv,
			[]*workerView{view("w-a", 4, 1), view("w-b", 4, 4, conv), view("w-c", 4, 2)}, "w-a", RouteFallbackFull},
		{"beyond the skew bound: least loaded", 0.5, conv,
			[]*workerView{view("w-a", 4, 0), view("w-b", 4, 3, conv)}, "w-a", RouteFallbackSkew},
		{"within a wider skew bound: warm", 0.8, conv,
			[]*workerView{view("w-a", 4, 0), view("w-b", 4, 3, conv)}, "w-b", RoutePrefixHit},
		{"a shorter warm match within the bound beats none", 0.5, long,
			[]*workerView{view("w-a", 4, 0), view("w-b", 4, 4, long), view("w-c", 4, 1, conv)}, "w-c", RoutePrefixHit},
		{"no match anywhere: least loaded", 0.5, cold,
			[]*workerView{view("w-a", 4, 1, conv), view("w-b", 4, 0, conv)}, "w-b", RouteNoMatch},
		{"a restarted worker (empty summary) is routed around", 0.5, conv,
			[]*workerView{view("w-a", 4, 0), view("w-b", 4, 1, conv)}, "w-b", RoutePrefixHit},
		{"once warm again it is a candidate like any", 0.5, conv,
			[]*workerView{view("w-a", 4, 0, conv), view("w-b", 4, 1, conv)}, "w-a", RoutePrefixHit},
		{"another model's prefixes do not count", 0.5, conv,
			[]*workerView{view("w-a", 4, 1), otherModel}, "w-z", RouteNoMatch},
		{"all full: nobody", 0.5, conv,
			[]*workerView{view("w-a", 4, 4), view("w-b", 4, 4, conv)}, "", RouteFallbackFull},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w, why := prefixRouter{maxSkew: tc.skew}.Pick(tc.lead, tc.cands)
			got := ""
			if w != nil {
				got = w.id
			}
			if got != tc.want || (w != nil && why != tc.reason) {
				t.Fatalf("picked %q (%s), want %q (%s)", got, why, tc.want, tc.reason)
			}
		})
	}
}

// TestPrefixRouterAdmit: a batch for a worker takes the jobs at home there and
// the homeless, not another worker's conversation. Mutation caught: Admit
// returning true (row "another worker's conversation stays").
func TestPrefixRouterAdmit(t *testing.T) {
	t.Parallel()
	a1 := chatJob("a1", strings.Repeat("conversation A ", 30))
	b1 := chatJob("b1", strings.Repeat("conversation B ", 30))
	wa, wb := view("w-a", 4, 0, a1), view("w-b", 4, 0, b1)
	full := view("w-b", 4, 4, b1)
	cold := &job{id: "x", req: schemas.JobRequest{Model: "m", Prompt: "nothing shared"}}
	cold.chain = prefix.OfJob(&cold.req)
	r := prefixRouter{maxSkew: 0.5}
	tests := []struct {
		name  string
		j     *job
		to    *workerView
		cands []*workerView
		want  bool
	}{
		{"its own conversation joins", chatJob("a2", strings.Repeat("conversation A ", 30), "next"), wa, []*workerView{wa, wb}, true},
		{"another worker's conversation stays", chatJob("b2", strings.Repeat("conversation B ", 30), "next"), wa, []*workerView{wa, wb}, false},
		{"a job with no match joins", cold, wa, []*workerView{wa, wb}, true},
		{"a job whose warm worker is full joins", chatJob("b3", strings.Repeat("conversation B ", 30)), wa, []*workerView{wa, full}, true},
		{"the shared system prompt alone ties: joins", chatJob("s1", "fresh"), wa, []*workerView{wa, wb}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := r.Admit(tc.j, tc.to, tc.cands); got != tc.want {
				t.Fatalf("Admit = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestLeastLoadedRouterIgnoresPrefixes: routing least_loaded is the old
// behaviour.
func TestLeastLoadedRouterIgnoresPrefixes(t *testing.T) {
	t.Parallel()
	conv := chatJob("c1", "q")
	w, why := leastLoaded{}.Pick(conv, []*workerView{view("w-b", 4, 1, conv), view("w-a", 4, 0)})
	if w == nil || w.id != "w-a" || why != RouteLeastLoaded {
		t.Fatalf("picked %v (%s)", w, why)
	}
}

// TestPrefixRoutingSendsSharedPrefixToWarmWorker: with real NATS, a dispatcher
// and two fake workers, jobs that share a conversation's prefix all go to the
// worker whose heartbeat advertises it, although the other one is idle and
// sorts first; once that worker restarted with an empty summary the next turn
// goes by load. Mutations caught: newRouter returning leastLoaded{} (every job
// goes to w-a, the cold one, by the id tie-break); intake leaving j.chain
// empty (same); observe keeping the old prefixes when a heartbeat has none
// (the restarted worker still looks warm).
func TestPrefixRoutingSendsSharedPrefixToWarmWorker(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	d, _ := runDispatcher(t, testConfig("d-route", e.nc))
	cold := e.startWorker("w-a", 4, []string{"m"}, nil)
	warm := e.startWorker("w-b", 4, []string{"m"}, nil)
	seen := chatJob("seen", "the first turn of the conversation")
	warm.Advertise([]schemas.ModelPrefixes{{Model: "m", Hashes: hexes(seen.chain)}})
	warm.Heartbeat()
	waitFor(t, 5*time.Second, "the dispatcher to see w-b's prefixes", func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		w := d.workers["w-b"]
		return w != nil && w.prefixes["m"].Match(seen.chain) == len(seen.chain)
	})
	var ids []string
	for i := range 4 {
		id := fmt.Sprintf("turn-%d", i)
		j := chatJob(id, "the first turn of the conversation", fmt.Sprintf("follow-up %d", i)).req
		j.MaxTokens, j.Priority, j.ReplyTo = 3, schemas.PriorityNormal, bus.ReplySubject("", id)
		e.mustSubmit(&j)
		ids = append(ids, id)
		if r := e.waitResult(id, 10*time.Second); r.Status != schemas.StatusCompleted {
			t.Fatalf("%s: %+v", id, r)
		}
	}
	onWarm, _, _ := warm.Snapshot()
	onCold, _, _ := cold.Snapshot()
	for _, id := range ids {
		if onWarm[id] != 1 || onCold[id] != 0 {
			t.Errorf("%s ran %d times on the warm worker and %d on the cold one", id, onWarm[id], onCold[id])
		}
	}
	if n := d.Metrics().RoutedCount(RoutePrefixHit); n < int64(len(ids)) {
		t.Errorf("%d batches counted prefix_hit, want at least %d", n, len(ids))
	}
	if len(onCold) != 0 {
		t.Errorf("the cold worker ran %v", onCold)
	}

	// The warm worker restarts: its cache is gone, its heartbeat says so, and
	// the conversation's next turn is routed by load (w-a, by the id tie-break).
	warm.Advertise(nil)
	warm.RestartNow()
	waitFor(t, 5*time.Second, "the dispatcher to see w-b's empty summary", func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.workers["w-b"].prefixes == nil
	})
	j := chatJob("after-restart", "the first turn of the conversation", "follow-up after the restart").req
	j.MaxTokens, j.Priority, j.ReplyTo = 3, schemas.PriorityNormal, bus.ReplySubject("", j.ID)
	e.mustSubmit(&j)
	if r := e.waitResult(j.ID, 10*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("%+v", r)
	}
	if onCold, _, _ = cold.Snapshot(); onCold[j.ID] != 1 {
		t.Errorf("after the restart the job did not go by load to w-a: %v", onCold)
	}
}

// TestRoutingConfig: the policy defaults to prefix with a skew bound of 0.5,
// and an unknown policy stops New.
func TestRoutingConfig(t *testing.T) {
	t.Parallel()
	c, err := Config{DispatcherID: "d", Conn: &nats.Conn{}}.withDefaults()
	if err != nil || c.Routing != RoutingPrefix || c.RouteMaxSkew != 0.5 {
		t.Fatalf("defaults: %q %v %v", c.Routing, c.RouteMaxSkew, err)
	}
	if _, ok := newRouter(c).(prefixRouter); !ok {
		t.Fatal("default router is not the prefix router")
	}
	if _, err := (Config{DispatcherID: "d", Conn: &nats.Conn{}, Routing: "random"}).withDefaults(); !errors.Is(err, ErrConfig) {
		t.Fatalf("unknown routing: %v", err)
	}
}
