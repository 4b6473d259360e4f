package bench

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"text/tabwriter"
)

// Target is one goal checked against the same run; it never fails the process.
type Target struct {
	Name   string  `json:"name"`
	Want   string  `json:"want"`
	Got    string  `json:"got"`
	Value  float64 `json:"value"`
	Pass   bool    `json:"pass"`
	Missed bool    `json:"missing,omitempty"` // a path or phase it needs did not run
}

func find(rows []Row, path string, c int) *Row {
	for i := range rows {
		if rows[i].Path == path && rows[i].Concurrency == c {
			return &rows[i]
		}
	}
	return nil
}

// targets evaluates the goals on one report.
func targets(r *Report) []Target {
	var out []Target
	missing := func(name, want string) {
		out = append(out, Target{Name: name, Want: want, Got: "not measured", Missed: true})
	}
	if bus, rt := find(r.Rows, PathBus, 1), find(r.Rows, PathRuntime, 1); bus != nil && rt != nil {
		d50, d95 := bus.TTFTP50-rt.TTFTP50, bus.TTFTP95-rt.TTFTP95
		out = append(out,
			Target{Name: "bus TTFT overhead P50 @1", Want: "≤ 1 ms over runtime", Got: fmt.Sprintf("%+.2f ms", d50), Value: d50, Pass: d50 <= 1},
			Target{Name: "bus TTFT overhead P95 @1", Want: "≤ 3 ms over runtime", Got: fmt.Sprintf("%+.2f ms", d95), Value: d95, Pass: d95 <= 3})
	} else {
		missing("bus TTFT overhead @1", "≤ 1 ms P50, ≤ 3 ms P95 over runtime")
	}
	for _, c := range r.Concurrency {
		bus, rt := find(r.Rows, PathBus, c), find(r.Rows, PathRuntime, c)
		name := fmt.Sprintf("bus tokens/s vs runtime @%d", c)
		if bus == nil || rt == nil || rt.TokensPerS == 0 {
			missing(name, "≥ 97%")
			continue
		}
		ratio := bus.TokensPerS / rt.TokensPerS
		out = append(out, Target{Name: name, Want: "≥ 97%", Got: fmt.Sprintf("%.1f%%", ratio*100), Value: ratio, Pass: ratio >= 0.97})
	}
	const hi = 32
	ref := find(r.Rows, PathMLXLMServer, hi)
	for _, p := range []string{PathBus, PathGateway} {
		row := find(r.Rows, p, hi)
		name := fmt.Sprintf("%s tokens/s vs mlx_lm_server @%d", p, hi)
		if row == nil || ref == nil || ref.TokensPerS == 0 {
			missing(name, "≥ 1.5×")
			missing(fmt.Sprintf("%s P95 TTFT vs mlx_lm_server @%d", p, hi), "no worse")
			continue
		}
		ratio := row.TokensPerS / ref.TokensPerS
		out = append(out, Target{Name: name, Want: "≥ 1.5×", Got: fmt.Sprintf("%.2f×", ratio), Value: ratio, Pass: ratio >= 1.5})
		out = append(out, Target{Name: fmt.Sprintf("%s P95 TTFT vs mlx_lm_server @%d", p, hi), Want: "no worse",
			Got: fmt.Sprintf("%.1f vs %.1f ms", row.TTFTP95, ref.TTFTP95), Value: row.TTFTP95 - ref.TTFTP95, Pass: row.TTFTP95 <= ref.TTFTP95})
	}
	errs := 0
	for _, row := range r.Rows {
		errs += row.Errors
	}
	if len(r.Rows) > 0 {
		out = append(out, Target{Name: "errors", Want: "0", Got: fmt.Sprint(errs), Value: float64(errs), Pass: errs == 0})
	}
	if r.Throughput != nil && r.NATSBench != nil && r.NATSBench.Ceiling() > 0 {
		ratio := r.Throughput.JobsPerS / r.NATSBench.Ceiling()
		out = append(out, Target{Name: "dispatcher jobs/s vs nats bench", Want: "≥ 50%",
			Got: fmt.Sprintf("%.0f / %.0f msgs/s = %.1f%%", r.Throughput.JobsPerS, r.NATSBench.Ceiling(), ratio*100), Value: ratio, Pass: ratio >= 0.5})
	} else {
		missing("dispatcher jobs/s vs nats bench", "≥ 50%")
	}
	if r.Throughput != nil {
		out = append(out, Target{Name: "dispatcher jobs/s (absolute)", Want: "≥ 10000", Got: fmt.Sprintf("%.0f", r.Throughput.JobsPerS), Value: r.Throughput.JobsPerS, Pass: r.Throughput.JobsPerS >= 10000})
	}
	if m := r.Memory; m != nil && m.DispatcherRSS > 0 {
		out = append(out, Target{Name: fmt.Sprintf("dispatcher RSS, %d queued", m.QueuedJobs), Want: "≤ 64 MB", Got: mb(m.DispatcherRSS), Value: float64(m.DispatcherRSS), Pass: m.DispatcherRSS <= 64<<20})
	} else {
		missing("dispatcher RSS, 100000 queued", "≤ 64 MB")
	}
	if m := r.Memory; m != nil && m.WorkerPeakRSS > 0 {
		out = append(out, Target{Name: "worker agent RSS (peak, no runtime)", Want: "≤ 32 MB", Got: mb(m.WorkerPeakRSS), Value: float64(m.WorkerPeakRSS), Pass: m.WorkerPeakRSS <= 32<<20})
	} else {
		missing("worker agent RSS", "≤ 32 MB")
	}
	return out
}

func mb(b int64) string { return fmt.Sprintf("%.1f MB", float64(b)/(1<<20)) }

// writeTable prints the rows, then the extra measurements and the targets.
func writeTable(w io.Writer, r *Report) {
	fmt.Fprintf(w, "\nmlx-serving bench — %s, %d cores, model %s, max_tokens %d\n\n", r.Machine.CPU, r.Machine.Cores, r.Model, r.MaxTokens)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "path\tconc\treqs\tTTFT p50\tp95\tp99 ms\tITL p50\tp95 ms\ttok/s\tper-stream\terrors\t")
	for _, row := range r.Rows {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.1f\t%.1f\t%.1f\t%.2f\t%.2f\t%.0f\t%.0f\t%d\t\n", row.Path, row.Concurrency, row.Requests,
			row.TTFTP50, row.TTFTP95, row.TTFTP99, row.ITLP50, row.ITLP95, row.TokensPerS, row.StreamTokensPS, row.Errors)
	}
	_ = tw.Flush()
	for _, row := range r.Rows {
		if row.Skewed {
			fmt.Fprintf(w, "  %s @%d: TTFT P95 is over 10× P50 (%.1f vs %.1f ms) — the tail is not steady serving\n", row.Path, row.Concurrency, row.TTFTP95, row.TTFTP50)
		}
		if row.FirstError != "" {
			fmt.Fprintf(w, "  %s @%d first error: %s\n", row.Path, row.Concurrency, row.FirstError)
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
			fmt.Fprintf(w, "dispatcher RSS with %d queued jobs: %s (peak %s)\n", m.QueuedJobs, mb(m.DispatcherRSS), mb(m.DispatcherPeakRSS))
		}
		if m.WorkerPeakRSS > 0 {
			fmt.Fprintf(w, "worker agent RSS (runtime excluded) under bus load: %s (peak %s)\n", mb(m.WorkerRSS), mb(m.WorkerPeakRSS))
		}
	}
	fmt.Fprintln(w, "\ntargets:")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, t := range r.Targets {
		verdict := "FAIL"
		if t.Pass {
			verdict = "PASS"
		} else if t.Missed {
			verdict = "n/a"
		}
		fmt.Fprintf(tw, "  %s\t%s\twant %s\tgot %s\n", verdict, t.Name, t.Want, t.Got)
	}
	_ = tw.Flush()
}

// writeSVG draws two grouped bar charts by hand: aggregate tokens/s and P95 TTFT
// per concurrency, one bar per path.
func writeSVG(w io.Writer, r *Report) error {
	paths := []string{}
	for _, row := range r.Rows {
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
		for _, row := range r.Rows {
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
				row := find(r.Rows, p, c)
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
