package dispatcher

import (
	"slices"

	"github.com/mlx-serving/mlx-serving/internal/prefix"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Routing policies (Config.Routing).
const (
	// RoutingPrefix sends a batch to the worker whose runtime already holds the
	// longest prefix of its lead job's prompt (heartbeat prefixes), within a
	// load bound; the default.
	RoutingPrefix = "prefix"
	// RoutingLeastLoaded sends a batch to the least loaded worker.
	RoutingLeastLoaded = "least_loaded"
)

// RouteReason says why a batch went to its worker; Metrics.Routed counts them.
type RouteReason int

// Route reasons.
const (
	// RoutePrefixHit: to a worker that holds a prefix of the lead job, the
	// longest among the workers with room within the skew bound.
	RoutePrefixHit RouteReason = iota
	// RouteNoMatch: no worker holds any prefix of the lead job; least loaded.
	RouteNoMatch
	// RouteFallbackFull: workers hold a prefix of it, but none has a free slot;
	// least loaded.
	RouteFallbackFull
	// RouteFallbackSkew: the warm workers with room are loaded more than
	// MaxSkew above the least loaded one; least loaded.
	RouteFallbackSkew
	// RouteLeastLoaded: the least_loaded policy chose.
	RouteLeastLoaded
	numRouteReasons
)

var routeReasonNames = [numRouteReasons]string{"prefix_hit", "no_match", "fallback_full", "fallback_skew", "least_loaded"}

func (r RouteReason) String() string {
	if r < 0 || r >= numRouteReasons {
		return "unknown"
	}
	return routeReasonNames[r]
}

// RouteReasons lists every reason, for collectors.
func RouteReasons() []RouteReason {
	out := make([]RouteReason, numRouteReasons)
	for i := range out {
		out[i] = RouteReason(i)
	}
	return out
}

// Router is a routing policy: which worker a batch goes to, and which queued
// jobs may ride along. A new policy is one implementation of it. Batches stay
// per model; the scheduler calls Pick for a batch's lead job and Admit for the
// other queued jobs of that model. Callers hold d.mu; a Router keeps nothing
// it is given.
type Router interface {
	// Pick chooses, among cands (routable workers that have the model; some
	// may have no free slot), the worker the batch led by lead goes to; nil
	// when none has a free slot.
	Pick(lead *job, cands []*workerView) (*workerView, RouteReason)
	// Admit reports whether j, a queued job of the same model, may join a
	// batch going to w (one of cands, chosen by Pick).
	Admit(j *job, w *workerView, cands []*workerView) bool
}

// newRouter returns the policy cfg names (validated by withDefaults).
func newRouter(cfg Config) Router {
	if cfg.Routing == RoutingLeastLoaded {
		return leastLoaded{}
	}
	return prefixRouter{maxSkew: cfg.RouteMaxSkew}
}

// load is the share of w's slots taken (by anyone, offers in flight included).
func load(w *workerView) float64 {
	return float64(w.hb.Slots-w.free()) / float64(max(w.hb.Slots, 1))
}

// leastLoadedOf is the least loaded worker of cands with a free slot (ties to
// the smaller id), nil when none has one.
func leastLoadedOf(cands []*workerView) *workerView {
	var best *workerView
	var bestLoad float64
	for _, w := range cands {
		if w.free() <= 0 {
			continue
		}
		if l := load(w); best == nil || l < bestLoad || (l == bestLoad && w.id < best.id) {
			best, bestLoad = w, l
		}
	}
	return best
}

// leastLoaded is the policy that ignores prefixes.
type leastLoaded struct{}

func (leastLoaded) Pick(_ *job, cands []*workerView) (*workerView, RouteReason) {
	return leastLoadedOf(cands), RouteLeastLoaded
}

func (leastLoaded) Admit(*job, *workerView, []*workerView) bool { return true }

// prefixRouter prefers the worker that holds the longest prefix of a job
// (internal/prefix chains, hashed once at intake, against the prefixes each
// worker's heartbeat advertises). Among workers with a free slot whose load
// is at most maxSkew (a share of slots) above the least loaded one's, the
// longest match wins (ties: lower load, then id); with no match there it
// falls back to the least loaded worker. A worker that restarted advertises
// nothing until it ran something, so it gets only jobs no warm worker can take.
//
// Batch members follow the same rule: a job joins a batch for w when w holds
// as long a prefix of it as its own best choice would, or when it has no
// warm choice (no match, or its warm workers are full or too loaded). So a
// conversation sticks to its warm worker and is not carried off in another
// conversation's batch, and a job with no home fills any batch.
type prefixRouter struct {
	maxSkew float64
}

// choose is Pick for any job: the worker, how many blocks of j it holds, why.
func (r prefixRouter) choose(j *job, cands []*workerView) (*workerView, int, RouteReason) {
	ll := leastLoadedOf(cands)
	if ll == nil {
		return nil, 0, RouteFallbackFull
	}
	floor := load(ll)
	var best *workerView
	bestM, bestLoad, longest, roomMatch := 0, 0.0, 0, 0
	for _, w := range cands {
		m := w.prefixes[j.req.Model].Match(j.chain)
		longest = max(longest, m)
		if m == 0 || w.free() <= 0 {
			continue
		}
		roomMatch = max(roomMatch, m)
		l := load(w)
		if l-floor > r.maxSkew {
			continue
		}
		if m > bestM || (m == bestM && (l < bestLoad || (l == bestLoad && w.id < best.id))) {
			best, bestM, bestLoad = w, m, l
		}
	}
	switch {
	case best != nil:
		return best, bestM, RoutePrefixHit
	case longest == 0:
		return ll, 0, RouteNoMatch
	case roomMatch == 0:
		return ll, 0, RouteFallbackFull
	}
	return ll, 0, RouteFallbackSkew
}

func (r prefixRouter) Pick(lead *job, cands []*workerView) (*workerView, RouteReason) {
	w, _, why := r.choose(lead, cands)
	return w, why
}

func (r prefixRouter) Admit(j *job, w *workerView, cands []*workerView) bool {
	_, m, why := r.choose(j, cands)
	return why != RoutePrefixHit || w.prefixes[j.req.Model].Match(j.chain) >= m
}

// prefixSets indexes a heartbeat's prefixes by model; hashes that do not parse
// are skipped (the worker validated its entry; a foreign writer is not trusted
// further than that).
func prefixSets(models []string, ps []schemas.ModelPrefixes) map[string]prefix.Set {
	if len(ps) == 0 {
		return nil
	}
	out := make(map[string]prefix.Set, len(ps))
	for _, p := range ps {
		if !slices.Contains(models, p.Model) {
			continue
		}
		s := out[p.Model]
		if s == nil {
			s = make(prefix.Set, len(p.Hashes))
			out[p.Model] = s
		}
		for _, h := range p.Hashes {
			if v, err := prefix.Parse(h); err == nil {
				s[v] = struct{}{}
			}
		}
	}
	return out
}
