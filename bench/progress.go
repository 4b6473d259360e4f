package bench

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

// progress draws one line on stderr: the phase, a bar, done/total and elapsed
// time. Redraws are rate-limited so a fast phase does not flood a terminal.
type progress struct {
	mu     sync.Mutex
	w      io.Writer
	phase  string
	total  int
	done   int
	start  time.Time
	drawn  time.Time
	active bool
	tty    bool // redraw in place; otherwise one line per phase
}

func newProgress(w io.Writer) *progress {
	p := &progress{w: w, start: time.Now()}
	if f, ok := w.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			p.tty = true
		}
	}
	return p
}

// begin starts a new phase of total steps.
func (p *progress) begin(phase string, total int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.phase, p.total, p.done = phase, total, 0
	p.drawLocked(true)
}

// step adds one done step.
func (p *progress) step() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done++
	p.drawLocked(p.done == p.total)
}

// end finishes the current line.
func (p *progress) end() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.active {
		if p.tty {
			p.drawLocked(true)
			fmt.Fprintln(p.w)
		} else {
			fmt.Fprintf(p.w, " %d/%d, %.0fs\n", p.done, p.total, time.Since(p.start).Seconds())
		}
		p.active = false
	}
}

func (p *progress) drawLocked(force bool) {
	if p.w == nil || (!force && time.Since(p.drawn) < 100*time.Millisecond) {
		return
	}
	if !p.tty {
		// A log file gets the phase once, and its outcome from end.
		if !p.active {
			fmt.Fprintf(p.w, "%-28s %5.0fs ...", p.phase, time.Since(p.start).Seconds())
			p.active = true
		}
		return
	}
	p.drawn = time.Now()
	const width = 30
	fill := 0
	if p.total > 0 {
		fill = min(width, p.done*width/p.total)
	}
	fmt.Fprintf(p.w, "\r%-28s [%s%s] %6d/%-6d %5.0fs", p.phase, strings.Repeat("=", fill), strings.Repeat(" ", width-fill), p.done, p.total, time.Since(p.start).Seconds())
	p.active = true
}
