package bench

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

// roundsReport is a run of len(direct) rounds at concurrency 1: direct and
// runtime tokens/s per round (runtime TTFT P50 10, 11, 12, ... ms).
func roundsReport(direct, runtime []float64) *Report {
	r := &Report{Rounds: len(direct), Concurrency: []int{1}}
	for k := range direct {
		r.Rows = append(r.Rows,
			Row{Path: PathDirect, Concurrency: 1, Requests: 32, TokensPerS: direct[k], Round: k + 1},
			Row{Path: PathRuntime, Concurrency: 1, Requests: 32, TokensPerS: runtime[k], TTFTP50: 10 + float64(k), Round: k + 1},
		)
	}
	return r
}

func target(t *testing.T, r *Report, name string) Target {
	t.Helper()
	for _, tg := range targets(r) {
		if tg.Name == name {
			return tg
		}
	}
	t.Fatalf("no target %q", name)
	return Target{}
}

// A ratio target of a run of rounds is the median of ratios each computed
// within one round: not the first round, not the mean, not the ratio of the
// medians of each path (which pairs rows of different rounds).
func TestRoundsRatioIsMedianOfPerRoundRatios(t *testing.T) {
	t.Parallel()
	const name = "runtime tokens/s vs direct @1"
	cases := []struct {
		name            string
		direct, runtime []float64
		verdict, got    string
	}{
		{"median passes where the mean and the last round fail",
			[]float64{100, 100, 100, 100, 100}, []float64{99, 70, 98, 97.5, 96},
			VerdictPass, "97.5% median of 5 rounds (70.0, 96.0, 97.5, 98.0, 99.0)"},
		{"median fails where the mean passes and one round is far over",
			[]float64{100, 100, 100, 100, 100}, []float64{96.8, 96.5, 100, 96, 140},
			VerdictFail, "96.8% median of 5 rounds (96.0, 96.5, 96.8, 100.0, 140.0)"},
		{"median fails where the first round passes",
			[]float64{100, 100, 100}, []float64{99, 90, 91},
			VerdictFail, "91.0% median of 3 rounds (90.0, 91.0, 99.0)"},
		{"ratios within each round: the load moved both paths together",
			[]float64{100, 200, 300}, []float64{99, 150, 297}, // medians 200 and 150 would read 75%
			VerdictPass, "99.0% median of 3 rounds (75.0, 99.0, 99.0)"},
		{"an even count takes the mean of the middle two",
			[]float64{100, 100, 100, 100}, []float64{90, 96, 98, 120},
			VerdictPass, "97.0% median of 4 rounds (90.0, 96.0, 98.0, 120.0)"},
	}
	for _, tc := range cases {
		tg := target(t, roundsReport(tc.direct, tc.runtime), name)
		if tg.Verdict != tc.verdict || tg.Got != tc.got {
			t.Errorf("%s: %s, got %q; want %s, %q", tc.name, tg.Verdict, tg.Got, tc.verdict, tc.got)
		}
		if len(tg.Rounds) != len(tc.direct) {
			t.Errorf("%s: per-round values %v, want %d", tc.name, tg.Rounds, len(tc.direct))
		}
	}
}

// A round where one side measured nothing is left out, and the verdict says so;
// with no round left the target is n/a, never a verdict on nothing.
func TestRoundsLeaveOutUnusableRounds(t *testing.T) {
	t.Parallel()
	const name = "runtime tokens/s vs direct @1"
	r := roundsReport([]float64{100, 100, 100}, []float64{50, 98, 99})
	r.Rows[1].Errors = r.Rows[1].Requests // runtime round 1 failed whole
	if tg := target(t, r, name); tg.Verdict != VerdictPass || tg.Got != "98.5% median of 2 of 3 rounds (98.0, 99.0)" {
		t.Errorf("one round out: %s %q", tg.Verdict, tg.Got)
	}
	for i := range r.Rows {
		if r.Rows[i].Path == PathDirect {
			r.Rows[i].Errors = r.Rows[i].Requests
		}
	}
	if tg := target(t, r, name); tg.Verdict != VerdictNA {
		t.Errorf("every round out: %s %q", tg.Verdict, tg.Got)
	}
}

// The other comparisons (TTFT over a reference, against mlx_lm_server) take the
// median of per-round differences the same way.
func TestRoundsDifferenceTargets(t *testing.T) {
	t.Parallel()
	r := &Report{Rounds: 3, Concurrency: []int{1, 32}}
	busOver := []float64{0.5, 4, 0.9} // median 0.9 ≤ 1 ms; mean 1.8 and round 2 would fail
	for k := range 3 {
		rt := 10 * float64(k+1)
		r.Rows = append(r.Rows,
			Row{Path: PathRuntime, Concurrency: 1, Requests: 8, TokensPerS: 100, TTFTP50: rt, TTFTP95: rt, Round: k + 1},
			Row{Path: PathBus, Concurrency: 1, Requests: 8, TokensPerS: 100, TTFTP50: rt + busOver[k], TTFTP95: rt + busOver[k], Round: k + 1},
			Row{Path: PathBus, Concurrency: 32, Requests: 8, TokensPerS: []float64{160, 140, 151}[k], TTFTP95: 50, Round: k + 1},
			Row{Path: PathMLXLMServer, Concurrency: 32, Requests: 8, TokensPerS: 100, TTFTP95: []float64{49, 52, 51}[k], Round: k + 1},
		)
	}
	for name, want := range map[string]string{
		"bus TTFT P50 over runtime @1":          "PASS +0.90 ms median of 3 rounds (+0.50, +0.90, +4.00)",
		"bus TTFT P95 over runtime @1":          "PASS +0.90 ms median of 3 rounds (+0.50, +0.90, +4.00)",
		"bus tokens/s vs mlx_lm_server @32":     "PASS 1.51× median of 3 rounds (1.40, 1.51, 1.60)",
		"bus P95 TTFT vs mlx_lm_server @32":     "PASS -1.0 ms median of 3 rounds (-2.0, -1.0, +1.0)",
		"gateway tokens/s vs mlx_lm_server @32": "n/a not measured (needs gateway and mlx_lm_server @32)",
	} {
		tg := target(t, r, name)
		if got := tg.Verdict + " " + tg.Got; got != want {
			t.Errorf("%s: %q, want %q", name, got, want)
		}
	}
}

func TestRoundOrderAlternates(t *testing.T) {
	t.Parallel()
	paths := []string{PathDirect, PathRuntime, PathBus}
	for k, want := range map[int][]string{
		1: {PathDirect, PathRuntime, PathBus},
		2: {PathBus, PathRuntime, PathDirect},
		3: {PathDirect, PathRuntime, PathBus},
	} {
		if got := roundOrder(paths, k); !slices.Equal(got, want) {
			t.Errorf("round %d: %v, want %v", k, got, want)
		}
	}
	if !slices.Equal(paths, []string{PathDirect, PathRuntime, PathBus}) {
		t.Errorf("roundOrder changed its argument: %v", paths)
	}
	if roundOf(1, 0) != 0 || roundOf(3, 0) != 1 || roundOf(3, 2) != 3 {
		t.Error("roundOf: a run of one round must leave Round 0 (absent from bench.json), else number rounds from 1")
	}
}

// The table of a run of rounds shows one row per path and level: medians of
// the usable rounds, requests and errors summed; one round's table is its rows.
func TestMedianRows(t *testing.T) {
	t.Parallel()
	r := roundsReport([]float64{100, 300, 200}, []float64{90, 80, 70})
	r.Rows[2].Errors, r.Rows[2].FirstError = 32, "boom" // direct round 2 (300) failed
	rows := medianRows(r)
	if len(rows) != 2 {
		t.Fatalf("%d rows, want 2: %+v", len(rows), rows)
	}
	d, rt := find(rows, PathDirect, 1), find(rows, PathRuntime, 1)
	if d.TokensPerS != 150 || d.Requests != 96 || d.Errors != 32 || d.FirstError != "boom" || d.Round != 0 {
		t.Errorf("direct median row %+v", *d)
	}
	if rt.TokensPerS != 80 || rt.TTFTP50 != 11 {
		t.Errorf("runtime median row %+v", *rt)
	}
	one := passing()
	if got := medianRows(one); len(got) != len(one.Rows) || &got[0] != &one.Rows[0] {
		t.Error("a run of one round must show its rows as they are")
	}
	var b strings.Builder
	writeTable(&b, r)
	if !strings.Contains(b.String(), "median over 3 rounds") || !strings.Contains(b.String(), "direct @1 round 2 first error: boom") {
		t.Errorf("table:\n%s", b.String())
	}
}

// --rounds 0 is the default of one round; a negative count is refused, not
// read as one round.
func TestRoundsOption(t *testing.T) {
	t.Parallel()
	o := Options{ModelDir: "m"}
	if err := o.defaults(); err != nil || o.Rounds != 1 {
		t.Errorf("default rounds %d, %v; want 1", o.Rounds, err)
	}
	o = Options{ModelDir: "m", Rounds: -1}
	if err := o.defaults(); !errors.Is(err, ErrOptions) {
		t.Errorf("rounds -1: %v, want ErrOptions", err)
	}
}
