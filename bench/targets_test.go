package bench

import (
	"encoding/json"
	"strings"
	"testing"
)

// passing is a run that meets every goal, each value at its limit exactly
// (the limits are inclusive), under the interval fsync.
func passing() *Report {
	return &Report{Concurrency: []int{1, 32}, Rows: []Row{
		{Path: PathDirect, Concurrency: 1, Requests: 32, TokensPerS: 100},
		{Path: PathRuntime, Concurrency: 1, Requests: 32, TokensPerS: 97, TTFTP50: 10, TTFTP95: 20},
		{Path: PathBus, Concurrency: 1, Requests: 32, TokensPerS: 97, TTFTP50: 11, TTFTP95: 23},
		{Path: PathGateway, Concurrency: 1, Requests: 32, TokensPerS: 97, TTFTP50: 13, TTFTP95: 30},
		{Path: PathDirect, Concurrency: 32, Requests: 128, TokensPerS: 1000},
		{Path: PathRuntime, Concurrency: 32, Requests: 128, TokensPerS: 900},
		{Path: PathBus, Concurrency: 32, Requests: 128, TokensPerS: 873, TTFTP95: 50},
		{Path: PathGateway, Concurrency: 32, Requests: 128, TokensPerS: 750, TTFTP95: 60},
		{Path: PathMLXLMServer, Concurrency: 32, Requests: 128, TokensPerS: 500, TTFTP95: 60},
	},
		Throughput: &ThroughputResult{JobsPerS: 10000},
		NATSBench:  &NATSBench{PubPerS: 20000, SubPerS: 30000},
		Memory: &Memory{QueuedJobs: 100000, DispatcherRSS: 64 << 20, HeldWorkers: 1, Slots: 32, BusySlots: 32,
			WorkerPeakRSS: 32 << 20, WorkerLoad: 32},
	}
}

func TestTargetVerdicts(t *testing.T) {
	t.Parallel()
	row := func(r *Report, path string, c int) *Row { return find(r.Rows, path, c) }
	cases := []struct {
		name   string
		change func(r *Report)
		want   map[string]string // target name -> verdict; every other target PASS unless n/a here
	}{
		{"every value at its limit", func(*Report) {}, map[string]string{
			"dispatcher jobs/s vs nats bench publish": VerdictNA, // judged under sync_always only
		}},
		{"each value just past its limit", func(r *Report) {
			row(r, PathRuntime, 1).TokensPerS = 96.9
			row(r, PathRuntime, 32).TokensPerS = 899
			row(r, PathBus, 1).TTFTP50, row(r, PathBus, 1).TTFTP95 = 11.01, 23.01
			row(r, PathGateway, 1).TTFTP50 = 13.02
			row(r, PathBus, 32).TokensPerS = 872
			row(r, PathGateway, 32).TTFTP95 = 60.1
			r.Throughput.JobsPerS = 9999
			r.Memory.WorkerPeakRSS = 32<<20 + 1
			r.Memory.DispatcherRSS = 64<<20 + 1
			row(r, PathMLXLMServer, 32).TokensPerS = 583 // bus 873 is 1.497×
			row(r, PathBus, 32).Errors = 1
		}, map[string]string{
			"runtime tokens/s vs direct @1":                                VerdictFail,
			"runtime tokens/s vs direct @32":                               VerdictFail,
			"bus TTFT P50 over runtime @1":                                 VerdictFail,
			"bus TTFT P95 over runtime @1":                                 VerdictFail,
			"gateway TTFT P50 over bus @1":                                 VerdictFail,
			"bus tokens/s vs runtime @32":                                  VerdictFail,
			"dispatcher jobs/s (ceiling phase)":                            VerdictFail,
			"dispatcher jobs/s vs nats bench publish":                      VerdictNA,
			"bus tokens/s vs mlx_lm_server @32":                            VerdictFail,
			"gateway tokens/s vs mlx_lm_server @32":                        VerdictFail,
			"gateway P95 TTFT vs mlx_lm_server @32":                        VerdictFail,
			"errors":                                                       VerdictFail,
			"dispatcher RSS, 100000 queued, 32/32 slots busy":              VerdictFail,
			"worker agent peak RSS under c=32 bus load (runtime excluded)": VerdictFail,
		}},
		{"sync_always judges the dispatcher against nats bench, at 50%", func(r *Report) {
			r.SyncAlways = true
			r.Throughput.JobsPerS = 10000 // half of publish
		}, map[string]string{
			"dispatcher jobs/s (ceiling phase)": VerdictNA,
		}},
		{"sync_always under 50% of nats bench publish", func(r *Report) {
			r.SyncAlways = true
			r.Throughput.JobsPerS = 9999
		}, map[string]string{
			"dispatcher jobs/s (ceiling phase)":       VerdictNA,
			"dispatcher jobs/s vs nats bench publish": VerdictFail,
		}},
		{"a dispatcher whose workers were not saturated is not judged", func(r *Report) {
			r.Memory.BusySlots = 31
			r.Memory.DispatcherRSS = 1 << 20
		}, map[string]string{
			"dispatcher jobs/s vs nats bench publish":         VerdictNA,
			"dispatcher RSS, 100000 queued, 31/32 slots busy": VerdictNA,
		}},
		{"nor one read with fewer than 100000 queued", func(r *Report) {
			r.Memory.QueuedJobs = 1000
		}, map[string]string{
			"dispatcher jobs/s vs nats bench publish":       VerdictNA,
			"dispatcher RSS, 1000 queued, 32/32 slots busy": VerdictNA,
		}},
		{"a worker read under less than c=32 is not judged", func(r *Report) {
			r.Memory.WorkerLoad = 8
			r.Memory.WorkerPeakRSS = 1 << 20
		}, map[string]string{
			"dispatcher jobs/s vs nats bench publish":                      VerdictNA,
			"worker agent peak RSS under c=32 bus load (runtime excluded)": VerdictNA,
		}},
		{"a path whose every request failed measured nothing", func(r *Report) {
			d := row(r, PathDirect, 32)
			d.Errors = d.Requests
		}, map[string]string{
			"dispatcher jobs/s vs nats bench publish": VerdictNA,
			"runtime tokens/s vs direct @32":          VerdictNA,
			"errors":                                  VerdictFail,
		}},
		{"bus only: what needs the other paths is n/a", func(r *Report) {
			var rows []Row
			for _, x := range r.Rows {
				if x.Path == PathBus {
					rows = append(rows, x)
				}
			}
			r.Rows, r.Throughput, r.NATSBench = rows, nil, nil
			r.Memory.DispatcherRSS = 0
		}, map[string]string{
			"runtime tokens/s vs direct @1":           "n/a",
			"runtime tokens/s vs direct @32":          "n/a",
			"bus TTFT P50 over runtime @1":            "n/a",
			"bus TTFT P95 over runtime @1":            "n/a",
			"gateway TTFT P50 over bus @1":            "n/a",
			"bus tokens/s vs runtime @1":              "n/a",
			"bus tokens/s vs runtime @32":             "n/a",
			"bus tokens/s vs mlx_lm_server @32":       "n/a",
			"gateway tokens/s vs mlx_lm_server @32":   "n/a",
			"bus P95 TTFT vs mlx_lm_server @32":       "n/a",
			"gateway P95 TTFT vs mlx_lm_server @32":   "n/a",
			"dispatcher jobs/s (ceiling phase)":       "n/a",
			"dispatcher jobs/s vs nats bench publish": "n/a",
			"dispatcher RSS with 100000 queued":       "n/a",
		}},
	}
	for _, tc := range cases {
		r := passing()
		tc.change(r)
		got := map[string]string{}
		for _, tg := range targets(r) {
			if _, dup := got[tg.Name]; dup {
				t.Errorf("%s: target %q twice", tc.name, tg.Name)
			}
			got[tg.Name] = tg.Verdict
			if tg.Pass != (tg.Verdict == VerdictPass) || tg.Missed != (tg.Verdict == VerdictNA) || tg.Goal == "" || tg.Words == "" {
				t.Errorf("%s: inconsistent target %+v", tc.name, tg)
			}
		}
		for name, v := range tc.want {
			if got[name] != v {
				t.Errorf("%s: %q = %q, want %q", tc.name, name, got[name], v)
			}
		}
		for name, v := range got {
			if _, listed := tc.want[name]; !listed && v != VerdictPass {
				t.Errorf("%s: %q = %q, want PASS", tc.name, name, v)
			}
		}
	}
}

// Every goal of issue #13 has a verdict in every run, measured or not, and
// the summary JSON carries it.
func TestEveryGoalJudged(t *testing.T) {
	t.Parallel()
	for _, r := range []*Report{passing(), {}} {
		seen := map[string]bool{}
		for _, tg := range targets(r) {
			seen[tg.Goal] = true
		}
		for _, g := range goals {
			if !seen[g.id] {
				t.Errorf("goal %s has no verdict in %+v", g.id, r)
			}
		}
	}
	b, err := json.Marshal(&Report{Targets: targets(passing())})
	if err != nil || !strings.Contains(string(b), `"verdict":"PASS"`) || !strings.Contains(string(b), `"goal":"worker-rss"`) {
		t.Fatalf("summary JSON lacks verdicts: %s, %v", b, err)
	}
}
