package bench

// Rounds (--rounds N > 1). On a shared machine whose load comes and goes, one
// pass of each path gives a ratio between two paths (runtime ÷ direct, bus ÷
// runtime, ...) that moves by ±10% from run to run of the same code: the two
// sides were timed seconds apart, under different load. With rounds, every
// concurrency level runs all the selected paths N times, the order reversed
// every other round (direct, runtime, bus, … then …, bus, runtime, direct), so
// a drift over time falls on both sides of a ratio alike; each comparison is
// computed within a round, from that round's rows, and judged on the median
// of the rounds — one slow round neither fails nor passes a target.

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/nats-io/nats.go"
)

// roundOf is the Round a row of 0-based round k carries: 0 (no round) in a
// run of one round, so that run's rows are what they were before rounds.
func roundOf(rounds, k int) int {
	if rounds <= 1 {
		return 0
	}
	return k + 1
}

// roundOrder is the order the paths run in round k (1-based): run order in
// odd rounds, reversed in even ones.
func roundOrder(paths []string, k int) []string {
	out := slices.Clone(paths)
	if k%2 == 0 {
		slices.Reverse(out)
	}
	return out
}

// roundRunner runs the paths of a run of several rounds. Each path's process
// stays up across every round and level (the runtime, the stack, the bus
// connection, mlx_lm.server), except direct: python/bench/direct_load.py
// measures the levels it is given on stdin and exits, so each (level, round) of
// direct is one run of it (loading the model and warming up, untimed).
type roundRunner struct {
	ctx     context.Context
	o       *Options
	r       *Report
	pb      *progress
	levels  [][]Request
	warm    []Request
	dir     string
	modelID string
	want    func(path string) bool
	fail    func(path string, err error) // rows with every request failed, every level and round
}

// run starts every selected path, then runs the rounds; st is the stack (nil
// when it is not needed or failed: bus and gateway were failed already).
func (b *roundRunner) run(st *stack) {
	ctx, o := b.ctx, b.o
	drivers := map[string]Driver{}
	if b.want(PathRuntime) && ctx.Err() == nil {
		b.pb.begin("runtime: starting", 1)
		d, err := startRuntime(ctx, o.Python, o.ModelDir, o.Slots)
		b.pb.end()
		if err != nil {
			b.fail(PathRuntime, err)
		} else {
			defer d.Close()
			drivers[PathRuntime] = d
		}
	}
	if st != nil && b.want(PathBus) {
		nc, err := nats.Connect(st.srv.ClientURL(), nats.Name("mlx-serving-bench-client"))
		var d *busDriver
		if err == nil {
			defer nc.Close()
			d, err = newBusDriver(nc, b.modelID)
		}
		if err != nil {
			b.fail(PathBus, err)
		} else {
			drivers[PathBus] = d
			b.r.Memory = &Memory{}
		}
	}
	if st != nil && b.want(PathGateway) {
		drivers[PathGateway] = newOpenAIDriver(st.gatewayURL, b.modelID, o.Slots)
	}
	if !b.want(PathMLXLMServer) || ctx.Err() != nil {
		b.rounds(st, drivers)
		return
	}
	ran := false
	err := runMLXLMServer(ctx, o, b.dir, func(d Driver) {
		ran = true
		drivers[PathMLXLMServer] = d
		b.rounds(st, drivers)
	})
	if err != nil {
		b.fail(PathMLXLMServer, err)
		if !ran {
			b.rounds(st, drivers)
		}
	}
}

// rounds runs, level by level, every round of every path that started.
func (b *roundRunner) rounds(st *stack, drivers map[string]Driver) {
	ctx, o := b.ctx, b.o
	var paths []string
	for _, p := range AllPaths {
		if b.want(p) && (p == PathDirect || drivers[p] != nil) {
			paths = append(paths, p)
		}
	}
	for _, p := range paths {
		if d := drivers[p]; d != nil {
			warmUp(ctx, d, b.warm)
		}
	}
	script := filepath.Join(o.Repo, "python", "bench", "direct_load.py")
	for i, c := range o.Concurrency {
		for k := 1; k <= o.Rounds; k++ {
			for _, p := range roundOrder(paths, k) {
				if ctx.Err() != nil {
					return
				}
				phase := fmt.Sprintf("%s @%d round %d/%d", p, c, k, o.Rounds)
				var row Row
				if p == PathDirect {
					row = b.direct(script, phase, i, c)
				} else {
					row = timeLevel(ctx, b.pb, p, phase, drivers[p], b.levels[i], c)
				}
				row.Round = k
				b.r.Rows = append(b.r.Rows, row)
				if p == PathBus && i == len(o.Concurrency)-1 && b.r.Memory != nil {
					// VmHWM is the peak over every round so far.
					if cur, peak, err := rss(st.worker.pid()); err == nil {
						b.r.Memory.WorkerRSS, b.r.Memory.WorkerPeakRSS, b.r.Memory.WorkerLoad = cur, peak, c
					}
				}
			}
		}
	}
}

// direct is one (level, round) of the direct path: one run of the script.
func (b *roundRunner) direct(script, phase string, i, c int) Row {
	b.pb.begin(phase+" (mlx-lm in process)", 1)
	samples, walls, err := runDirect(b.ctx, b.o.Python, script, b.o.ModelDir, b.o.Slots, b.levels[i:i+1], []int{c})
	b.pb.step()
	b.pb.end()
	if err != nil {
		b.r.Notes = append(b.r.Notes, fmt.Sprintf("%s: %v", phase, err))
		n := len(b.levels[i])
		return Row{Path: PathDirect, Concurrency: c, Requests: n, Errors: n, FirstError: err.Error()}
	}
	return summarize(PathDirect, c, samples[0], walls[0])
}

// findRound is the row of path at c in round k.
func findRound(rows []Row, path string, c, k int) *Row {
	for i := range rows {
		if rows[i].Path == path && rows[i].Concurrency == c && rows[i].Round == k {
			return &rows[i]
		}
	}
	return nil
}

// median of xs (not empty): the middle value, or the mean of the two middle
// ones. A median, not a mean: one round under a burst of load from elsewhere
// would move a mean by a fifth of its error, and not the median.
func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// comparison is a goal that compares a path with a reference path at one
// concurrency, from one pair of rows.
type comparison struct {
	// value is the goal's value from one pair of rows, and how a run of one
	// round shows it.
	value func(row, base *Row) (float64, string)
	// show prints a value without its unit (the per-round list); unit follows
	// the median.
	show func(v float64) string
	unit string
	// ok says whether base can be compared with (a ratio needs base > 0).
	ok func(base *Row) bool
}

var (
	ratioPct = func(f func(*Row) float64) comparison {
		return comparison{
			value: func(row, base *Row) (float64, string) {
				v := f(row) / f(base)
				return v, fmt.Sprintf("%.1f%% (%.0f / %.0f)", v*100, f(row), f(base))
			},
			show: func(v float64) string { return fmt.Sprintf("%.1f", v*100) }, unit: "%",
			ok: func(base *Row) bool { return f(base) > 0 },
		}
	}
	tokensPerS = func(r *Row) float64 { return r.TokensPerS }
)

// compare measures path against ref at c. With one round, from the first rows
// of each, as a run always did. With several, cmp.value runs on each round's
// pair of rows (both from that round, so both saw that round's load), and the
// value judged is the median over the rounds where both rows are usable.
// ok is false when no pair could be compared.
func compare(r *Report, name, path, ref string, c int, cmp comparison) (measured, bool) {
	usablePair := func(row, base *Row) bool {
		return usable(row) && usable(base) && (cmp.ok == nil || cmp.ok(base))
	}
	if r.Rounds <= 1 {
		row, base := find(r.Rows, path, c), find(r.Rows, ref, c)
		if !usablePair(row, base) {
			return measured{}, false
		}
		v, got := cmp.value(row, base)
		return measured{name: name, value: v, got: got}, true
	}
	var vals []float64
	for k := 1; k <= r.Rounds; k++ {
		row, base := findRound(r.Rows, path, c, k), findRound(r.Rows, ref, c, k)
		if usablePair(row, base) {
			v, _ := cmp.value(row, base)
			vals = append(vals, v)
		}
	}
	if len(vals) == 0 {
		return measured{}, false
	}
	med := median(vals)
	sorted := slices.Clone(vals)
	slices.Sort(sorted)
	shown := make([]string, len(sorted))
	for i, v := range sorted {
		shown[i] = cmp.show(v)
	}
	of := fmt.Sprint(len(vals))
	if len(vals) < r.Rounds {
		of = fmt.Sprintf("%d of %d", len(vals), r.Rounds)
	}
	return measured{name: name, value: med, rounds: vals,
		got: fmt.Sprintf("%s%s median of %s rounds (%s)", cmp.show(med), cmp.unit, of, strings.Join(shown, ", "))}, true
}

// medianRows is what the table and the plot show: the rows themselves in a run
// of one round; with several, one row per path and level whose every timing
// and rate is the median over the rounds where that path measured something,
// and whose requests, tokens and errors are summed over the rounds. Each
// round's rows stay in Report.Rows (bench.json, with "round").
func medianRows(r *Report) []Row {
	if r.Rounds <= 1 {
		return r.Rows
	}
	var out []Row
	for _, first := range r.Rows {
		if find(out, first.Path, first.Concurrency) != nil {
			continue
		}
		m := Row{Path: first.Path, Concurrency: first.Concurrency}
		cols := make([][]float64, 8)
		for _, row := range r.Rows {
			if row.Path != m.Path || row.Concurrency != m.Concurrency {
				continue
			}
			m.Requests += row.Requests
			m.Errors += row.Errors
			m.Tokens += row.Tokens
			if m.FirstError == "" {
				m.FirstError = row.FirstError
			}
			if !usable(&row) {
				continue
			}
			for j, v := range []float64{row.TTFTP50, row.TTFTP95, row.TTFTP99, row.ITLP50, row.ITLP95, row.TokensPerS, row.StreamTokensPS, row.WallS} {
				cols[j] = append(cols[j], v)
			}
		}
		if len(cols[0]) > 0 {
			med := make([]float64, len(cols))
			for j := range cols {
				med[j] = median(cols[j])
			}
			m.TTFTP50, m.TTFTP95, m.TTFTP99, m.ITLP50, m.ITLP95, m.TokensPerS, m.StreamTokensPS, m.WallS =
				med[0], med[1], med[2], med[3], med[4], med[5], med[6], med[7]
			m.Skewed = m.TTFTP50 > 0 && m.TTFTP95 > 10*m.TTFTP50
		}
		out = append(out, m)
	}
	return out
}
