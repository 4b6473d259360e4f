package worker

import (
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Bounds on the logprobs a terminal result carries: it is one NATS message (1 MiB
// by default) next to the whole text, while token events carry every entry. The
// runtime applies the same bounds to the logprobs of its result line
// (python/mlx_serving_runtime/output.py, bound_logprobs), which otherwise grew
// past the pipe's line limit and took the runtime down with every job beside
// it (red team round 19, runtime F1).
const (
	maxResultLogprobs      = 4096      // the result schema's maxItems
	maxResultLogprobsBytes = 256 << 10 // an estimate of their JSON size
)

// boundLogprobs returns the leading entries that fit the result's bounds, and
// whether any were cut.
func boundLogprobs(lps []schemas.TokenLogprob) ([]schemas.TokenLogprob, bool) {
	size := 0
	for i, e := range lps {
		size += logprobSize(e.Token, len(e.Bytes))
		for _, t := range e.TopLogprobs {
			size += logprobSize(t.Token, len(t.Bytes))
		}
		if i >= maxResultLogprobs || size > maxResultLogprobsBytes {
			return lps[:i], true
		}
	}
	if lps == nil {
		lps = []schemas.TokenLogprob{} // asked for: present, even when empty
	}
	return lps, false
}

// logprobSize over-estimates one entry's JSON: a token escaped at worst 6 bytes a
// byte, up to 4 bytes a byte value, 24 for the number, 48 for keys and punctuation.
func logprobSize(token string, nbytes int) int { return 6*len(token) + 4*nbytes + 24 + 48 }
