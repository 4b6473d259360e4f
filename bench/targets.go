package bench

import (
	"fmt"
	"strings"
)

// Target is one goal checked against the same run; it never fails the process.
// Verdict is PASS, FAIL, or n/a when the run did not measure what the goal needs
// (a path or phase left out, or a run under the other fsync setting); Got then
// says why.
type Target struct {
	Goal    string  `json:"goal"`  // the goal's id in goals
	Words   string  `json:"words"` // the goal as its issue words it
	Name    string  `json:"name"`  // what was compared, with its concurrency
	Want    string  `json:"want"`
	Got     string  `json:"got"`
	Value   float64 `json:"value"`
	Pass    bool    `json:"pass"`
	Missed  bool    `json:"missing,omitempty"`
	Verdict string  `json:"verdict"`
	// Rounds: with --rounds N > 1, a comparison's value in each round (round
	// order; rounds where a side measured nothing left out); Value is their median.
	Rounds []float64 `json:"rounds,omitempty"`
}

// Verdicts.
const (
	VerdictPass = "PASS"
	VerdictFail = "FAIL"
	VerdictNA   = "n/a"
)

// measured is one value a goal is judged on; missing says why there is none.
type measured struct {
	name    string
	value   float64
	got     string
	missing string
	rounds  []float64 // per-round values of a comparison; value is their median
}

// goal is one target: its threshold, in the words of the issue that set it, and
// how to read its value(s) off a run. atMost: the value must be ≤ limit, else ≥.
type goal struct {
	id      string
	words   string
	atMost  bool
	limit   float64
	want    string
	measure func(r *Report) []measured
}

// goals are every target the bench judges, in one place. Ratios are fractions
// (0.97 is 97%), times are ms, memory is MiB (printed MB, as `ps` does).
var goals = []goal{
	{id: "dispatcher-jobs-per-s", words: "#13.1: dispatcher ≥ 10,000 jobs/s on this 2-core machine with the interval fsync",
		limit: 10000, want: "≥ 10000 jobs/s (interval fsync)", measure: dispatcherRate},
	{id: "dispatcher-vs-nats-bench", words: "#13.1: dispatcher ≥ 50% of `nats bench` JetStream publish with sync_always: true (same store and setting)",
		limit: 0.5, want: "≥ 50% of nats bench publish (sync_always)", measure: dispatcherVsNATS},
	{id: "runtime-vs-direct-32", words: "#13.2: runtime ≥ 90% of direct mlx-lm at concurrency 32 (same run)",
		limit: 0.9, want: "≥ 90%", measure: tokensRatio(PathRuntime, PathDirect, 32)},
	{id: "runtime-vs-direct-1", words: "#13.2: runtime ≥ 97% of direct mlx-lm at concurrency 1 (same run)",
		limit: 0.97, want: "≥ 97%", measure: tokensRatio(PathRuntime, PathDirect, 1)},
	{id: "bus-ttft-p50", words: "#13.3: bus adds ≤ 1 ms P50 to TTFT over the runtime at concurrency 1",
		atMost: true, limit: 1, want: "≤ 1 ms over runtime", measure: ttftOver(PathBus, PathRuntime, 1, 50)},
	{id: "bus-ttft-p95", words: "#13.3: bus adds ≤ 3 ms P95 to TTFT over the runtime at concurrency 1",
		atMost: true, limit: 3, want: "≤ 3 ms over runtime", measure: ttftOver(PathBus, PathRuntime, 1, 95)},
	{id: "gateway-ttft-p50", words: "#13.3: gateway ≤ 2 ms P50 over bus (TTFT, concurrency 1)",
		atMost: true, limit: 2, want: "≤ 2 ms over bus", measure: ttftOver(PathGateway, PathBus, 1, 50)},
	{id: "bus-vs-runtime-tokens", words: "#13.3: bus ≥ 97% of runtime tokens/s at every concurrency",
		limit: 0.97, want: "≥ 97%", measure: busVsRuntimeEvery},
	{id: "worker-rss", words: "#13.4: worker agent ≤ 32 MB under the concurrency-32 load",
		atMost: true, limit: 32, want: "≤ 32 MB", measure: workerRSS},
	{id: "dispatcher-rss", words: "#13.4: dispatcher ≤ 64 MB with 100,000 queued while workers are saturated (it holds work)",
		atMost: true, limit: 64, want: "≤ 64 MB", measure: dispatcherRSS},
	{id: "mlx-lm-server-tokens", words: "bus and gateway tokens/s ≥ 1.5× mlx_lm_server at 32 (README's first targets)",
		limit: 1.5, want: "≥ 1.5×", measure: vsServer(comparison{value: func(row, ref *Row) (float64, string) {
			return row.TokensPerS / ref.TokensPerS, fmt.Sprintf("%.2f×", row.TokensPerS/ref.TokensPerS)
		}, show: func(v float64) string { return fmt.Sprintf("%.2f", v) }, unit: "×"}, "tokens/s")},
	{id: "mlx-lm-server-p95", words: "bus and gateway P95 TTFT no worse than mlx_lm_server at 32 (README's first targets)",
		atMost: true, limit: 0, want: "no worse", measure: vsServer(comparison{value: func(row, ref *Row) (float64, string) {
			return row.TTFTP95 - ref.TTFTP95, fmt.Sprintf("%.1f vs %.1f ms", row.TTFTP95, ref.TTFTP95)
		}, show: func(v float64) string { return fmt.Sprintf("%+.1f", v) }, unit: " ms"}, "P95 TTFT")},
	{id: "errors", words: "no request fails", atMost: true, limit: 0, want: "0", measure: errorCount},
}

// targets judges every goal on one run: a pure function of the report's rows
// and measurements.
func targets(r *Report) []Target {
	var out []Target
	for _, g := range goals {
		for _, m := range g.measure(r) {
			t := Target{Goal: g.id, Words: g.words, Name: m.name, Want: g.want, Got: m.got, Value: m.value, Rounds: m.rounds}
			switch {
			case m.missing != "":
				t.Got, t.Missed, t.Verdict = m.missing, true, VerdictNA
			case g.atMost && m.value <= g.limit, !g.atMost && m.value >= g.limit:
				t.Pass, t.Verdict = true, VerdictPass
			default:
				t.Verdict = VerdictFail
			}
			out = append(out, t)
		}
	}
	return out
}

func find(rows []Row, path string, c int) *Row {
	for i := range rows {
		if rows[i].Path == path && rows[i].Concurrency == c {
			return &rows[i]
		}
	}
	return nil
}

// usable is a row that measured something: it ran and not every request failed.
func usable(row *Row) bool { return row != nil && row.Errors < row.Requests }

func notMeasured(name string, paths ...string) measured {
	return measured{name: name, missing: "not measured (needs " + strings.Join(paths, " and ") + ")"}
}

func tokensRatio(path, ref string, c int) func(*Report) []measured {
	return func(r *Report) []measured {
		name := fmt.Sprintf("%s tokens/s vs %s @%d", path, ref, c)
		m, ok := compare(r, name, path, ref, c, ratioPct(tokensPerS))
		if !ok {
			return []measured{notMeasured(name, fmt.Sprintf("%s and %s @%d", path, ref, c))}
		}
		return []measured{m}
	}
}

func ttftOver(path, ref string, c int, p int) func(*Report) []measured {
	return func(r *Report) []measured {
		name := fmt.Sprintf("%s TTFT P%d over %s @%d", path, p, ref, c)
		m, ok := compare(r, name, path, ref, c, comparison{value: func(row, base *Row) (float64, string) {
			a, b := row.TTFTP50, base.TTFTP50
			if p == 95 {
				a, b = row.TTFTP95, base.TTFTP95
			}
			return a - b, fmt.Sprintf("%+.2f ms (%.2f vs %.2f)", a-b, a, b)
		}, show: func(v float64) string { return fmt.Sprintf("%+.2f", v) }, unit: " ms"})
		if !ok {
			return []measured{notMeasured(name, fmt.Sprintf("%s and %s @%d", path, ref, c))}
		}
		return []measured{m}
	}
}

func busVsRuntimeEvery(r *Report) []measured {
	var out []measured
	for _, c := range r.Concurrency {
		out = append(out, tokensRatio(PathBus, PathRuntime, c)(r)...)
	}
	if len(out) == 0 {
		out = append(out, notMeasured("bus tokens/s vs runtime", "a concurrency level"))
	}
	return out
}

func vsServer(cmp comparison, what string) func(*Report) []measured {
	cmp.ok = func(ref *Row) bool { return ref.TokensPerS > 0 }
	return func(r *Report) []measured {
		const c = 32
		var out []measured
		for _, p := range []string{PathBus, PathGateway} {
			name := fmt.Sprintf("%s %s vs mlx_lm_server @%d", p, what, c)
			m, ok := compare(r, name, p, PathMLXLMServer, c, cmp)
			if !ok {
				out = append(out, notMeasured(name, fmt.Sprintf("%s and mlx_lm_server @%d", p, c)))
				continue
			}
			out = append(out, m)
		}
		return out
	}
}

func errorCount(r *Report) []measured {
	if len(r.Rows) == 0 {
		return []measured{notMeasured("errors", "a path")}
	}
	errs := 0
	for _, row := range r.Rows {
		errs += row.Errors
	}
	return []measured{{name: "errors", value: float64(errs), got: fmt.Sprint(errs)}}
}

func dispatcherRate(r *Report) []measured {
	const name = "dispatcher jobs/s (ceiling phase)"
	switch {
	case r.SyncAlways:
		return []measured{{name: name, missing: "n/a under sync_always: judged on a run with the interval fsync"}}
	case r.Throughput == nil:
		return []measured{notMeasured(name, "the ceiling phase")}
	}
	t := r.Throughput
	return []measured{{name: name, value: t.JobsPerS, got: fmt.Sprintf("%.0f jobs/s", t.JobsPerS)}}
}

func dispatcherVsNATS(r *Report) []measured {
	const name = "dispatcher jobs/s vs nats bench publish"
	switch {
	case !r.SyncAlways:
		return []measured{{name: name, missing: "n/a under the interval fsync: judged on a --sync-always run"}}
	case r.Throughput == nil || r.NATSBench == nil || r.NATSBench.Error != "" || r.NATSBench.PubPerS <= 0:
		return []measured{notMeasured(name, "the ceiling phase", "nats bench")}
	}
	v := r.Throughput.JobsPerS / r.NATSBench.PubPerS
	return []measured{{name: name, value: v, got: fmt.Sprintf("%.0f / %.0f = %.1f%%", r.Throughput.JobsPerS, r.NATSBench.PubPerS, v*100)}}
}

func workerRSS(r *Report) []measured {
	const name = "worker agent peak RSS under c=32 bus load (runtime excluded)"
	m := r.Memory
	if m == nil || m.WorkerPeakRSS <= 0 {
		return []measured{notMeasured(name, "the bus path")}
	}
	if m.WorkerLoad < 32 {
		return []measured{{name: name, missing: fmt.Sprintf("n/a: measured at concurrency %d, the goal is under 32", m.WorkerLoad)}}
	}
	return []measured{{name: name, value: mib(m.WorkerPeakRSS), got: mb(m.WorkerPeakRSS)}}
}

func dispatcherRSS(r *Report) []measured {
	m := r.Memory
	if m == nil || m.DispatcherRSS <= 0 {
		return []measured{notMeasured("dispatcher RSS with 100000 queued", "the queue phase")}
	}
	name := fmt.Sprintf("dispatcher RSS, %d queued, %d/%d slots busy", m.QueuedJobs, m.BusySlots, m.Slots)
	switch {
	case m.QueuedJobs < 100000:
		return []measured{{name: name, missing: fmt.Sprintf("n/a: %d queued, the goal is at 100000", m.QueuedJobs)}}
	case m.Slots == 0 || m.BusySlots < m.Slots:
		return []measured{{name: name, missing: "n/a: the workers were not saturated"}}
	}
	return []measured{{name: name, value: mib(m.DispatcherRSS), got: mb(m.DispatcherRSS)}}
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

func mb(b int64) string { return fmt.Sprintf("%.1f MB", mib(b)) }
