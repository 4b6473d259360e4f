package bench

import (
	"math"
	"slices"
	"time"
)

// Row is one (path, concurrency) result; its JSON keys are bench.json's.
type Row struct {
	Path           string  `json:"path"`
	Concurrency    int     `json:"concurrency"`
	Requests       int     `json:"requests"`
	TTFTP50        float64 `json:"ttft_p50_ms"`
	TTFTP95        float64 `json:"ttft_p95_ms"`
	TTFTP99        float64 `json:"ttft_p99_ms"`
	ITLP50         float64 `json:"itl_p50_ms"`
	ITLP95         float64 `json:"itl_p95_ms"`
	TokensPerS     float64 `json:"tokens_per_s"`
	StreamTokensPS float64 `json:"stream_tokens_per_s"`
	Tokens         int     `json:"tokens"`
	WallS          float64 `json:"wall_s"`
	Errors         int     `json:"errors"`
	FirstError     string  `json:"first_error,omitempty"`
	// Skewed: TTFT P95 above 10× P50 — something other than steady serving
	// (compiling new shapes, a stall) is in the tail; read the row with care.
	Skewed bool `json:"skewed,omitempty"`
	// Round is the row's round (1..N) in a run of --rounds N > 1; 0 (absent)
	// in a run of one round.
	Round int `json:"round,omitempty"`
}

// percentile is the nearest-rank percentile of sorted xs (0 when empty).
func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	k := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[min(max(k, 0), len(sorted)-1)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// summarize turns samples into a Row. TTFT is send → first token event; ITL is
// the gap between consecutive events spread over the tokens the later one
// carries; tokens/s is every completed token over the wall time; per-stream
// tokens/s is the mean of each request's tokens over its own duration.
func summarize(path string, concurrency int, samples []Sample, wall time.Duration) Row {
	r := Row{Path: path, Concurrency: concurrency, Requests: len(samples), WallS: wall.Seconds()}
	var ttft, itl []float64
	var streamSum float64
	var streams int
	for _, s := range samples {
		if s.Err != nil || len(s.Events) == 0 {
			r.Errors++
			if r.FirstError == "" {
				if s.Err != nil {
					r.FirstError = s.Err.Error()
				} else {
					r.FirstError = "no token streamed"
				}
			}
			continue
		}
		r.Tokens += s.Tokens
		ttft = append(ttft, ms(s.Events[0].At.Sub(s.Start)))
		for i := 1; i < len(s.Events); i++ {
			gap := ms(s.Events[i].At.Sub(s.Events[i-1].At)) / float64(s.Events[i].Tokens)
			for range s.Events[i].Tokens {
				itl = append(itl, gap)
			}
		}
		if d := s.End.Sub(s.Start); d > 0 {
			streamSum += float64(s.Tokens) / d.Seconds()
			streams++
		}
	}
	slices.Sort(ttft)
	slices.Sort(itl)
	r.TTFTP50, r.TTFTP95, r.TTFTP99 = percentile(ttft, 50), percentile(ttft, 95), percentile(ttft, 99)
	r.ITLP50, r.ITLP95 = percentile(itl, 50), percentile(itl, 95)
	r.Skewed = r.TTFTP50 > 0 && r.TTFTP95 > 10*r.TTFTP50
	if wall > 0 {
		r.TokensPerS = float64(r.Tokens) / wall.Seconds()
	}
	if streams > 0 {
		r.StreamTokensPS = streamSum / float64(streams)
	}
	return r
}
