package worker

import (
	"context"
	"sync"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/prefix"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// maxPrefixRuns bounds the runs the prefix log remembers: each holds at most
// prefix.MaxBlocks+1 hashes, so the log stays under 150 KB whatever runs.
const maxPrefixRuns = 64

// prefixLog remembers the prompt prefixes this worker's current runtime ran, for
// the heartbeat's routing hints (schemas.HeartbeatMsg.Prefixes), and the
// runtime's prompt-cache stats. Everything in it belongs to one runtime process
// (one RuntimeClient): another process starts with an empty cache, so the log
// empties when the client changes.
type prefixLog struct {
	mu      sync.Mutex
	runtime *RuntimeClient
	runs    []prefixRun // oldest first
	seq     uint64      // last run's number
	stats   *schemas.PromptCacheStats
	asked   uint64 // the last run recorded before stats were asked for
}

// prefixRun is one completed job: the chain of its prompt followed by its reply,
// and its prompt's own last hash when that is not in the first (a partial block).
type prefixRun struct {
	model  string
	hashes []prefix.Hash
	seq    uint64
}

// reset empties the log for runtime c. Callers hold mu.
func (l *prefixLog) reset(c *RuntimeClient) {
	l.runtime, l.runs, l.stats = c, nil, nil
}

// ran records a job that completed on runtime c.
func (l *prefixLog) ran(c *RuntimeClient, model string, hashes []prefix.Hash) {
	if c == nil || len(hashes) == 0 {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if c != l.runtime {
		l.reset(c)
	}
	l.seq++
	l.runs = append(l.runs, prefixRun{model: model, hashes: hashes, seq: l.seq})
	if n := len(l.runs) - maxPrefixRuns; n > 0 {
		l.runs = append(l.runs[:0:0], l.runs[n:]...)
	}
}

// mark is the number of the last run recorded, for observe.
func (l *prefixLog) mark() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.seq
}

// observe applies a health answer of runtime c asked for after run number
// asked was recorded: an empty cache (or none at all) forgets every run up to
// that one; later runs may not be in the stats yet.
func (l *prefixLog) observe(c *RuntimeClient, stats *schemas.PromptCacheStats, asked uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if c != l.runtime {
		l.reset(c)
	}
	l.stats, l.asked = stats, asked
	if stats != nil && (stats.Entries == 0 || stats.MaxBytes == 0) {
		keep := l.runs[:0]
		for _, r := range l.runs {
			if r.seq > asked {
				keep = append(keep, r)
			}
		}
		clear(l.runs[len(keep):])
		l.runs = keep
	}
}

// summary is what the heartbeat carries for runtime cur (nil: none is up): the
// cache stats, and the hashes of the most recent runs, deepest first within a
// run, each once, at most schemas.MaxHeartbeatPrefixes. With stats, only the
// last stats.Entries runs the stats could know of count (the runtime's LRU
// holds that many caches), plus the runs recorded since, and a cache that is off (max_bytes 0) advertises nothing. Without stats (a
// runtime that does not report them) the runs are advertised as they are.
func (l *prefixLog) summary(cur *RuntimeClient) (*schemas.PromptCacheStats, []schemas.ModelPrefixes) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if cur == nil || cur != l.runtime {
		return nil, nil
	}
	var stats *schemas.PromptCacheStats
	runs := l.runs
	if l.stats != nil {
		s := *l.stats
		stats = &s
		if s.MaxBytes == 0 {
			return stats, nil
		}
		known := 0 // runs the stats could count
		for known < len(runs) && runs[known].seq <= l.asked {
			known++
		}
		runs = runs[max(known-s.Entries, 0):]
	}
	var out []schemas.ModelPrefixes
	index := map[string]int{}
	seen := map[prefix.Hash]bool{}
	total := 0
	for i := len(runs) - 1; i >= 0 && total < schemas.MaxHeartbeatPrefixes; i-- {
		r := runs[i]
		k, ok := index[r.model]
		if !ok {
			k = len(out)
			index[r.model] = k
			out = append(out, schemas.ModelPrefixes{Model: r.model})
		}
		for _, h := range r.hashes {
			if total == schemas.MaxHeartbeatPrefixes {
				break
			}
			if seen[h] {
				continue
			}
			seen[h] = true
			out[k].Hashes = append(out[k].Hashes, h.String())
			total++
		}
	}
	// A model whose runs were all duplicates of another's hashes has none.
	keep := out[:0]
	for _, m := range out {
		if len(m.Hashes) > 0 {
			keep = append(keep, m)
		}
	}
	return stats, keep
}

// runHashes is what a completed job adds: the chain of its prompt followed by
// its reply, deepest first, then its prompt's last hash when it is a partial
// block the first chain does not hold.
func runHashes(job *schemas.JobRequest, reply string) []prefix.Hash {
	after := prefix.AfterReply(job, reply)
	out := make([]prefix.Hash, 0, len(after)+1)
	for i := len(after) - 1; i >= 0; i-- {
		out = append(out, after[i])
	}
	if own := prefix.OfJob(job); len(own) > 0 {
		last := own[len(own)-1]
		if len(own) > len(after) || after[len(own)-1] != last {
			out = append(out, last)
		}
	}
	return out
}

// prefixRan records that r completed with text (the whole text of the job, a
// resumed attempt's earlier text included): its runtime now caches the prompt
// and the reply. A run on a runtime that is no longer the current one is not
// recorded.
func (a *Agent) prefixRan(r *jobRun, text string) {
	r.mu.Lock()
	c := r.client
	r.mu.Unlock()
	if c == nil || c != a.sup.client() {
		return
	}
	a.prefixes.ran(c, r.aj.Job.Model, runHashes(&r.aj.Job, text))
}

// pollPromptCache asks the runtime for its prompt-cache stats every interval
// until ctx ends; the heartbeat carries the last answer. Its own loop, so a
// slow health answer never delays a heartbeat.
func (a *Agent) pollPromptCache(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		c := a.sup.client()
		asked := a.prefixes.mark()
		if c != nil {
			hctx, cancel := context.WithTimeout(ctx, a.cfg.HealthTimeout)
			h, err := c.Health(hctx)
			cancel()
			if err == nil {
				a.prefixes.observe(c, h.PromptCache, asked)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
