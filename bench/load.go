package bench

import (
	"context"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Request is one generation every path runs the same way: raw prompt (no chat
// template), greedy sampling, a token budget.
type Request struct {
	Index     int
	Prompt    string
	MaxTokens int
}

// Sample is what one request looked like from its client: when it was sent, when
// each token event arrived (with how many tokens it carried) and when it ended.
type Sample struct {
	Start  time.Time
	Events []Event
	End    time.Time
	// Tokens is the completion token count the server reported (usage), or the
	// tokens counted from the events when it reports none.
	Tokens int
	Err    error
}

// Event is one streamed delta.
type Event struct {
	At     time.Time
	Tokens int // tokens this event carries (≥ 1)
}

// Recorder collects one request's events. It is used by one goroutine.
type Recorder struct {
	s *Sample
}

// Token records an event carrying n tokens, now.
func (r *Recorder) Token(n int) {
	if n < 1 {
		n = 1
	}
	r.s.Events = append(r.s.Events, Event{At: time.Now(), Tokens: n})
}

// Spread sets the recorded events' token counts to add up to total, evenly (the
// first events take the remainder): for a stream whose events do not say how many
// tokens each carries (OpenAI's SSE chunks), once the server has counted them.
// The worker sends a job's deltas at most every 20 ms, so a chunk often carries
// several tokens; counted as one each, the gaps between chunks would read as
// per-token latency.
func (r *Recorder) Spread(total int) {
	n := len(r.s.Events)
	if n == 0 || total <= n {
		return
	}
	for i := range r.s.Events {
		r.s.Events[i].Tokens = total / n
		if i < total%n {
			r.s.Events[i].Tokens++
		}
	}
}

// Driver runs requests along one path. Do must be safe for concurrent use.
type Driver interface {
	// Do runs req to its end, calling rec.Token for every streamed delta, and
	// returns the completion tokens the server counted (0: count the events).
	Do(ctx context.Context, req Request, rec *Recorder) (int, error)
}

// runLoad runs reqs through d with a closed loop of concurrency clients: each
// client sends its next request as soon as its previous one ended, so exactly
// concurrency requests are in flight until the queue runs dry. It returns the
// samples in request order and the wall time from first send to last end.
func runLoad(ctx context.Context, d Driver, reqs []Request, concurrency int, done func()) ([]Sample, time.Duration) {
	samples := make([]Sample, len(reqs))
	var cpu0 map[int]procCPU
	if os.Getenv(CPUEnv) != "" {
		cpu0 = treeCPU(os.Getpid())
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= len(reqs) || ctx.Err() != nil {
					return
				}
				s := &samples[i]
				s.Start = time.Now()
				n, err := d.Do(ctx, reqs[i], &Recorder{s: s})
				s.End = time.Now()
				s.Err = err
				s.Tokens = n
				if n == 0 {
					for _, e := range s.Events {
						s.Tokens += e.Tokens
					}
				}
				done()
			}
		}()
	}
	wg.Wait()
	wall := time.Since(start)
	if cpu0 != nil {
		recordCPU(cpu0, concurrency, samples, wall)
	}
	return samples, wall
}

// warmUp runs every prompt once through d, untimed (JIT, connections).
func warmUp(ctx context.Context, d Driver, warm []Request) {
	for _, w := range warm {
		_, _ = d.Do(ctx, w, &Recorder{s: &Sample{}})
	}
}

// timeLevel warms d up at concurrency c (a batch size new to this level
// compiles new shapes), then times reqs at c; phase labels the progress bar.
// Every round of --rounds warms its level again, so each round of each path
// starts from the same state.
func timeLevel(ctx context.Context, pb *progress, path, phase string, d Driver, reqs []Request, c int) Row {
	warmLevel := make([]Request, 0, c)
	for _, q := range reqs[:min(c, len(reqs))] {
		warmLevel = append(warmLevel, Request{Prompt: q.Prompt, MaxTokens: 8})
	}
	_, _ = runLoad(ctx, d, warmLevel, c, func() {})
	pb.begin(phase, len(reqs))
	samples, wall := runLoad(ctx, d, reqs, c, pb.step)
	pb.end()
	return summarize(path, c, samples, wall)
}
