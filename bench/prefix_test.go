package bench

import (
	"errors"
	"testing"
	"time"
)

// The prefix rows count cached tokens, stickiness (a turn on the worker of the
// conversation's previous turn) and errors from the samples they are given.
func TestSummarizePrefix(t *testing.T) {
	t.Parallel()
	ok := func(w string, cached int) turnSample {
		return turnSample{ttft: 10 * time.Millisecond, tokens: 4, prompt: 100, cached: cached, worker: w}
	}
	row := summarizePrefix(PrefixModes[0], [][]turnSample{
		{ok("w1", 0), ok("w1", 90), ok("w1", 95)},
		{ok("w2", 0), ok("w1", 50), {err: errors.New("boom")}},
	}, time.Second)
	if row.Requests != 6 || row.Errors != 1 || row.FirstError != "boom" {
		t.Fatalf("counts %+v", row)
	}
	if row.HitRate != 235.0/500 || row.Cached != 47 || row.Prompt != 100 {
		t.Fatalf("cache %+v", row)
	}
	if row.Sticky != 2.0/3 || row.ByWorker["w1"] != 4 || row.ByWorker["w2"] != 1 {
		t.Fatalf("routing %+v", row)
	}
	if row.TokensPerS != 20 || row.TTFTP50 != 10 {
		t.Fatalf("speed %+v", row)
	}
}

func TestWordsAreDeterministic(t *testing.T) {
	t.Parallel()
	if words("a", 50) != words("a", 50) || words("a", 50) == words("b", 50) || len(words("a", 700)) < 2000 {
		t.Fatal("filler text")
	}
}
