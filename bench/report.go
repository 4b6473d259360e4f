package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
)

// writeTable prints the rows, then the extra measurements and the targets.
func writeTable(w io.Writer, r *Report) {
	fmt.Fprintf(w, "\nmlx-serving bench — %s, %d cores, model %s, max_tokens %d\n\n", r.Machine.CPU, r.Machine.Cores, r.Model, r.MaxTokens)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	if r.Rounds > 1 {
		fmt.Fprintf(w, "each row: the median over %d rounds of each timing and rate; reqs and errors summed over the rounds (each round's rows: bench.json, \"round\")\n\n", r.Rounds)
	}
	fmt.Fprintln(tw, "path\tconc\treqs\tTTFT p50\tp95\tp99 ms\tITL p50\tp95 ms\ttok/s\tper-stream\terrors\t")
	for _, row := range medianRows(r) {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.1f\t%.1f\t%.1f\t%.2f\t%.2f\t%.0f\t%.0f\t%d\t\n", row.Path, row.Concurrency, row.Requests,
			row.TTFTP50, row.TTFTP95, row.TTFTP99, row.ITLP50, row.ITLP95, row.TokensPerS, row.StreamTokensPS, row.Errors)
	}
	_ = tw.Flush()
	for _, row := range r.Rows {
		at := fmt.Sprintf("%s @%d", row.Path, row.Concurrency)
		if row.Round > 0 {
			at += fmt.Sprintf(" round %d", row.Round)
		}
		if row.Skewed {
			fmt.Fprintf(w, "  %s: TTFT P95 is over 10× P50 (%.1f vs %.1f ms) — the tail is not steady serving\n", at, row.TTFTP95, row.TTFTP50)
		}
		if row.FirstError != "" {
			fmt.Fprintf(w, "  %s first error: %s\n", at, row.FirstError)
		}
	}
	if t := r.Throughput; t != nil {
		fmt.Fprintf(w, "\ndispatcher ceiling: %d one-token jobs, %d fake workers × %d slots: %.0f jobs/s (%.1fs, %d errors%s)\n",
			t.Jobs, t.Workers, t.Slots, t.JobsPerS, t.Seconds, t.Errors, map[bool]string{true: ", stopped at the time bound", false: ""}[t.TimedOut])
	}
	if n := r.NATSBench; n != nil {
		if n.Error != "" {
			fmt.Fprintf(w, "nats bench: %s\n", n.Error)
		} else {
			fmt.Fprintf(w, "nats bench (%s, %d B msgs, same server and store): JetStream publish %.0f msgs/s, consume %.0f msgs/s\n", n.Version, n.Size, n.PubPerS, n.SubPerS)
		}
	}
	if m := r.Memory; m != nil {
		if m.DispatcherRSS > 0 {
			fmt.Fprintf(w, "dispatcher RSS with %d queued jobs, %d/%d slots of %d fake worker(s) busy on jobs that never finish: %s (process peak %s)\n",
				m.QueuedJobs, m.BusySlots, m.Slots, m.HeldWorkers, mb(m.DispatcherRSS), mb(m.DispatcherPeakRSS))
			fmt.Fprintf(w, "  dispatcher pulled %d (not acked), %d still in JOBS; busy slots + one batch = %d%s\n",
				m.Pulled, m.StillQueued, m.PullBound, map[bool]string{true: " — it pulled MORE than that", false: ""}[m.Pulled > m.PullBound])
		}
		if m.WorkerPeakRSS > 0 {
			fmt.Fprintf(w, "worker agent RSS (runtime excluded) after the bus load @%d: %s (peak %s)\n", m.WorkerLoad, mb(m.WorkerRSS), mb(m.WorkerPeakRSS))
		}
	}
	writeTargets(w, r.Targets)
}

// writeTargets prints one verdict per target, then the goals in their issue's
// words.
func writeTargets(w io.Writer, ts []Target) {
	fmt.Fprintln(w, "\ntargets:")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, t := range ts {
		fmt.Fprintf(tw, "  %s\t%s\twant %s\tgot %s\n", t.Verdict, t.Name, t.Want, t.Got)
	}
	_ = tw.Flush()
	pass, fail, na := 0, 0, 0
	for _, t := range ts {
		switch t.Verdict {
		case VerdictPass:
			pass++
		case VerdictFail:
			fail++
		default:
			na++
		}
	}
	fmt.Fprintf(w, "%d PASS, %d FAIL, %d n/a\n", pass, fail, na)
	fmt.Fprintln(w, "\ngoals:")
	seen := map[string]bool{}
	for _, t := range ts {
		if !seen[t.Goal] {
			seen[t.Goal] = true
			fmt.Fprintf(w, "  %-26s %s\n", t.Goal, t.Words)
		}
	}
}

// writeSVG draws two grouped bar charts by hand: aggregate tokens/s and P95 TTFT
// per concurrency, one bar per path.
func writeSVG(w io.Writer, r *Report) error {
	rows := medianRows(r) // with rounds, find on r.Rows would plot round 1 alone
	paths := []string{}
	for _, row := range rows {
		if !slices.Contains(paths, row.Path) {
			paths = append(paths, row.Path)
		}
	}
	colors := []string{"#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1"}
	const W, H, panelH, left, top = 900, 640, 240, 70, 40
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", W, H)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", W, H)
	panel := func(y0 int, title string, val func(Row) float64, unit string) {
		maxV := 0.0
		for _, row := range rows {
			maxV = math.Max(maxV, val(row))
		}
		if maxV == 0 {
			maxV = 1
		}
		maxV = niceCeil(maxV)
		fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="14" font-weight="bold">%s</text>`+"\n", left, y0-12, title)
		plotW := W - left - 160
		for i := 0; i <= 4; i++ {
			y := y0 + panelH - i*panelH/4
			fmt.Fprintf(&b, `<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="#ddd"/>`+"\n", left, left+plotW, y, y)
			fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end">%s</text>`+"\n", left-6, y+4, trimFloat(maxV*float64(i)/4))
		}
		fmt.Fprintf(&b, `<text x="%d" y="%d" transform="rotate(-90 %d %d)" text-anchor="middle">%s</text>`+"\n", 16, y0+panelH/2, 16, y0+panelH/2, unit)
		groupW := plotW / max(len(r.Concurrency), 1)
		barW := (groupW - 20) / max(len(paths), 1)
		for gi, c := range r.Concurrency {
			gx := left + gi*groupW + 10
			for pi, p := range paths {
				row := find(rows, p, c)
				if row == nil {
					continue
				}
				h := int(val(*row) / maxV * panelH)
				fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" fill="%s"><title>%s @%d: %.1f %s</title></rect>`+"\n",
					gx+pi*barW, y0+panelH-h, barW-2, h, colors[pi%len(colors)], p, c, val(*row), unit)
			}
			fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle">concurrency %d</text>`+"\n", gx+(groupW-20)/2, y0+panelH+16, c)
		}
	}
	panel(top, "aggregate tokens/s (higher is better)", func(r Row) float64 { return r.TokensPerS }, "tokens/s")
	panel(top+panelH+70, "time to first token, P95 (lower is better)", func(r Row) float64 { return r.TTFTP95 }, "ms")
	for pi, p := range paths {
		y := top + 20 + pi*20
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="12" height="12" fill="%s"/><text x="%d" y="%d">%s</text>`+"\n", W-140, y, colors[pi%len(colors)], W-122, y+10, p)
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

func niceCeil(v float64) float64 {
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if m*p >= v {
			return m * p
		}
	}
	return 10 * p
}

func trimFloat(v float64) string {
	if v >= 10 {
		return fmt.Sprintf("%.0f", v)
	}
	return strings.TrimRight(strings.TrimRight(fmt.Sprintf("%.2f", v), "0"), ".")
}

// WriteFiles writes the rows to jsonPath (bench.json), the whole report
// beside it as <name>.summary.json, and the plot as <name>.svg.
func WriteFiles(r *Report, jsonPath string) (summaryPath, svgPath string, err error) {
	if err := os.MkdirAll(filepath.Dir(jsonPath), 0o755); err != nil {
		return "", "", err
	}
	base := strings.TrimSuffix(jsonPath, filepath.Ext(jsonPath))
	summaryPath, svgPath = base+".summary.json", base+".svg"
	rows, err := json.MarshalIndent(r.Rows, "", "  ")
	if err != nil {
		return "", "", err
	}
	if err := os.WriteFile(jsonPath, append(rows, '\n'), 0o644); err != nil {
		return "", "", err
	}
	all, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return "", "", err
	}
	if err := os.WriteFile(summaryPath, append(all, '\n'), 0o644); err != nil {
		return "", "", err
	}
	f, err := os.Create(svgPath)
	if err != nil {
		return "", "", err
	}
	if err := writeSVG(f, r); err != nil {
		f.Close()
		return "", "", err
	}
	return summaryPath, svgPath, f.Close()
}

// WriteTable prints the report for people.
func WriteTable(w io.Writer, r *Report) { writeTable(w, r) }
