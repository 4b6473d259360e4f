package bench

import (
	"errors"
	"math"
	"testing"
	"time"
)

func TestPercentileNearestRank(t *testing.T) {
	t.Parallel()
	xs := []float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	for _, c := range []struct{ p, want float64 }{{50, 5}, {95, 10}, {99, 10}, {10, 1}, {0, 1}} {
		if got := percentile(xs, c.p); got != c.want {
			t.Errorf("P%v = %v, want %v", c.p, got, c.want)
		}
	}
	if percentile(nil, 50) != 0 {
		t.Error("percentile of nothing is not 0")
	}
}

func TestSummarize(t *testing.T) {
	t.Parallel()
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	samples := []Sample{
		// TTFT 10 ms, then one event of 1 token after 2 ms and one of 2 tokens after 6 ms.
		{Start: at(0), Events: []Event{{At: at(10), Tokens: 1}, {At: at(12), Tokens: 1}, {At: at(18), Tokens: 2}}, End: at(20), Tokens: 4},
		{Start: at(0), Events: []Event{{At: at(30), Tokens: 1}}, End: at(40), Tokens: 1},
		{Start: at(0), End: at(5), Err: errors.New("boom")},
		{Start: at(0), End: at(5)}, // ended without a token: an error too
	}
	r := summarize("bus", 2, samples, 2*time.Second)
	if r.Errors != 2 || r.FirstError != "boom" {
		t.Fatalf("errors %d (%q), want 2 (boom)", r.Errors, r.FirstError)
	}
	if r.Tokens != 5 || r.TokensPerS != 2.5 {
		t.Fatalf("tokens %d at %v/s, want 5 at 2.5/s", r.Tokens, r.TokensPerS)
	}
	if r.TTFTP50 != 10 || r.TTFTP99 != 30 {
		t.Fatalf("TTFT p50 %v p99 %v, want 10 and 30", r.TTFTP50, r.TTFTP99)
	}
	// ITL samples: 2, 3, 3 (the 6 ms gap spread over its 2 tokens).
	if r.ITLP50 != 3 || r.ITLP95 != 3 {
		t.Fatalf("ITL p50 %v p95 %v, want 3 and 3", r.ITLP50, r.ITLP95)
	}
	// Per stream: 4 tokens in 20 ms = 200/s, 1 in 40 ms = 25/s.
	if math.Abs(r.StreamTokensPS-112.5) > 1e-9 {
		t.Fatalf("per-stream %v, want 112.5", r.StreamTokensPS)
	}
}

// A row whose TTFT tail is over 10× its median is flagged; a steady one is not.
func TestSummarizeFlagsASkewedTail(t *testing.T) {
	mk := func(ttfts ...time.Duration) []Sample {
		var out []Sample
		t0 := time.Unix(0, 0)
		for _, d := range ttfts {
			out = append(out, Sample{Start: t0, Events: []Event{{At: t0.Add(d), Tokens: 1}}, End: t0.Add(d), Tokens: 1})
		}
		return out
	}
	steady := summarize("p", 1, mk(10*time.Millisecond, 11*time.Millisecond, 12*time.Millisecond), time.Second)
	var ds []time.Duration
	for range 18 {
		ds = append(ds, 8*time.Millisecond)
	}
	skewed := summarize("p", 1, mk(append(ds, 5*time.Second, 5*time.Second)...), time.Second)
	if steady.Skewed || !skewed.Skewed {
		t.Fatalf("steady %+v skewed %+v", steady, skewed)
	}
}

// A stream whose chunks do not carry token counts gets the server's count spread
// over them, so ITL is per token, not per chunk.
// Mutation caught: Spread returning at once leaves ITL at the chunk gap (20 ms).
func TestSpreadMakesITLPerToken(t *testing.T) {
	start := time.Unix(0, 0)
	s := Sample{Start: start, End: start.Add(60 * time.Millisecond), Tokens: 10}
	rec := &Recorder{s: &s}
	for i := range 4 { // 4 chunks, 20 ms apart, 10 tokens in all
		s.Events = append(s.Events, Event{At: start.Add(time.Duration(i) * 20 * time.Millisecond), Tokens: 1})
	}
	rec.Spread(10)
	sum := 0
	for _, e := range s.Events {
		sum += e.Tokens
	}
	if sum != 10 || s.Events[0].Tokens != 3 || s.Events[3].Tokens != 2 {
		t.Fatalf("tokens per event %+v", s.Events)
	}
	row := summarize("gateway", 1, []Sample{s}, 60*time.Millisecond)
	if row.ITLP50 > 10.1 || row.ITLP50 < 6.6 {
		t.Fatalf("ITL P50 %.2f ms, want the 20 ms gaps spread over 2-3 tokens", row.ITLP50)
	}
	rec.Spread(2) // fewer than the events: left as it is
	if s.Events[0].Tokens != 3 {
		t.Fatalf("Spread below the event count changed %+v", s.Events)
	}
}
