package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// PrefixOptions configure the prefix-cache benchmark: multi-turn chats that
// share one long system prompt, over several workers, run three ways in one
// invocation — prompt cache with prefix routing, the cache with least-loaded
// routing, and neither — each on a fresh stack (empty caches), so the only
// difference between the rows is the two features.
type PrefixOptions struct {
	Exe, Python, ModelDir string
	Workers               int   // default 2
	Slots                 int   // per worker, default 4
	Conversations         int   // default 16
	Turns                 int   // user turns per conversation, default 4
	Concurrency           int   // conversations in flight at once, default 8
	SystemWords           int   // words of the shared system prompt, default 340 (about 1,080 tokens with the tiny tokenizer)
	DocWords              int   // words of each conversation's own document (first turn), default 60
	MaxTokens             int   // per turn, default 16
	CacheBytes            int64 // each worker's --prompt-cache-bytes when the cache is on (0: the runtime's default)
	SyncAlways            bool
	Progress              io.Writer
}

func (o *PrefixOptions) defaults() {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&o.Workers, 2)
	def(&o.Slots, 4)
	def(&o.Conversations, 16)
	def(&o.Turns, 4)
	def(&o.Concurrency, 8)
	def(&o.SystemWords, 340)
	def(&o.DocWords, 60)
	def(&o.MaxTokens, 16)
}

// PrefixMode is one configuration of the comparison.
type PrefixMode struct {
	Name    string `json:"name"`
	Cache   bool   `json:"cache"`
	Routing string `json:"routing"` // the dispatcher's --routing
}

// PrefixModes are the three rows, in the order they run.
var PrefixModes = []PrefixMode{
	{"cache+routing", true, "prefix"},
	{"cache only", true, "least_loaded"},
	{"neither", false, "least_loaded"},
}

// PrefixRow is one mode's measurement.
type PrefixRow struct {
	Mode       PrefixMode `json:"mode"`
	Requests   int        `json:"requests"`
	Errors     int        `json:"errors"`
	FirstError string     `json:"first_error,omitempty"`
	TTFTP50    float64    `json:"ttft_p50_ms"`
	TTFTP95    float64    `json:"ttft_p95_ms"`
	// RuntimeTTFT is the runtime's own time from accepting the request to its
	// first generated token (the result's timings.ttft_ms): prefill and batch
	// waits, without the bus, and without the detokenizer holding back bytes
	// that are not yet text (a large part of the client's TTFT on random weights).
	RuntimeTTFTP50 float64        `json:"runtime_ttft_p50_ms"`
	RuntimeTTFTP95 float64        `json:"runtime_ttft_p95_ms"`
	TokensPerS     float64        `json:"tokens_per_s"`
	WallS          float64        `json:"wall_s"`
	Prompt         float64        `json:"prompt_tokens_mean"`
	Cached         float64        `json:"cached_tokens_mean"`
	HitRate        float64        `json:"cached_fraction"` // cached / prompt tokens over every request
	ByWorker       map[string]int `json:"jobs_by_worker"`
	// Sticky is the fraction of turns after the first that ran on the worker
	// that ran the conversation's previous turn.
	Sticky float64 `json:"sticky"`
}

// PrefixReport is one run of the three modes.
type PrefixReport struct {
	Machine Machine        `json:"machine"`
	Model   string         `json:"model"`
	Options map[string]any `json:"options"`
	Rows    []PrefixRow    `json:"rows"`
	// TTFTSpeedup is neither's TTFT P50 over cache+routing's (the target is ≥ 3);
	// RuntimeTTFTSpeedup the same ratio of the runtime's own TTFT.
	TTFTSpeedup        float64  `json:"ttft_p50_speedup"`
	RuntimeTTFTSpeedup float64  `json:"runtime_ttft_p50_speedup"`
	Notes              []string `json:"notes,omitempty"`
}

// RunPrefix runs the three modes.
func RunPrefix(ctx context.Context, o PrefixOptions) (*PrefixReport, error) {
	o.defaults()
	model := filepath.Base(filepath.Clean(o.ModelDir))
	r := &PrefixReport{Machine: machine(), Model: model, Options: map[string]any{
		"workers": o.Workers, "slots": o.Slots, "conversations": o.Conversations, "turns": o.Turns,
		"concurrency": o.Concurrency, "system_words": o.SystemWords, "doc_words": o.DocWords,
		"max_tokens": o.MaxTokens, "cache_bytes": o.CacheBytes, "sync_always": o.SyncAlways,
	}}
	root, err := os.MkdirTemp("", "mlx-serving-bench-prefix-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(root)
	for i, m := range PrefixModes {
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, "bench prefix: %s — starting %d workers\n", m.Name, o.Workers)
		}
		row, err := runPrefixMode(ctx, o, m, model, filepath.Join(root, strconv.Itoa(i)))
		if err != nil {
			return r, fmt.Errorf("%s: %w", m.Name, err)
		}
		r.Rows = append(r.Rows, row)
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, "bench prefix: %s — TTFT P50 %.1f ms, cached %.0f of %.0f prompt tokens\n", m.Name, row.TTFTP50, row.Cached, row.Prompt)
		}
	}
	if best, none := r.Rows[0], r.Rows[len(r.Rows)-1]; best.TTFTP50 > 0 {
		r.TTFTSpeedup = none.TTFTP50 / best.TTFTP50
		if best.RuntimeTTFTP50 > 0 {
			r.RuntimeTTFTSpeedup = none.RuntimeTTFTP50 / best.RuntimeTTFTP50
		}
	}
	return r, nil
}

// prefixStack is NATS in this process, a dispatcher and the workers as children.
type prefixStack struct {
	srv      *natsserver.Server
	nc       *nats.Conn
	js       jetstream.JetStream
	children []*child
}

func (s *prefixStack) close() {
	for _, c := range slices.Backward(s.children) {
		c.stop(30 * time.Second)
	}
	if s.nc != nil {
		s.nc.Close()
	}
	if s.srv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = s.srv.Shutdown(ctx)
	}
}

func startPrefixStack(ctx context.Context, o PrefixOptions, m PrefixMode, model, dir string) (*prefixStack, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	s := &prefixStack{}
	var err error
	if s.srv, err = natsserver.Start(ctx, natsserver.Options{Host: "127.0.0.1", Port: -1, StoreDir: filepath.Join(dir, "jetstream"),
		SyncAlways: o.SyncAlways, ServerName: "mlx-serving-bench-prefix", Logger: zerolog.Nop()}); err != nil {
		return nil, fmt.Errorf("start NATS: %w", err)
	}
	fail := func(err error) (*prefixStack, error) { s.close(); return nil, err }
	if s.nc, err = bus.Connect(ctx, bus.ConnectOptions{URLs: []string{s.srv.ClientURL()}, Name: "mlx-serving-bench"}); err != nil {
		return fail(err)
	}
	if s.js, err = jetstream.New(s.nc); err != nil {
		return fail(err)
	}
	if err := jsprov.Provision(ctx, s.js, jsprov.Options{}); err != nil {
		return fail(fmt.Errorf("provision: %w", err))
	}
	common := []string{"--nats", s.srv.ClientURL(), "--log-level", "warn", "--data-dir", dir}
	d, err := startChild(o.Exe, dir, "dispatcher", append([]string{"dispatcher", "--routing", m.Routing}, common...)...)
	if err != nil {
		return fail(err)
	}
	s.children = append(s.children, d)
	cacheBytes := "0"
	if m.Cache {
		cacheBytes = "-1" // the runtime's default
		if o.CacheBytes > 0 {
			cacheBytes = strconv.FormatInt(o.CacheBytes, 10)
		}
	}
	var ids []string
	for i := range o.Workers {
		id := fmt.Sprintf("bench-w%d", i+1)
		ids = append(ids, id)
		w, err := startChild(o.Exe, dir, id, append([]string{"worker", "--worker-id", id, "--model", o.ModelDir,
			"--slots", strconv.Itoa(o.Slots), "--python", o.Python, "--prompt-cache-bytes", cacheBytes}, common...)...)
		if err != nil {
			return fail(err)
		}
		s.children = append(s.children, w)
	}
	wctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	for {
		hbs, err := registry.Snapshot(wctx, s.js)
		ready := 0
		for _, hb := range hbs {
			if slices.Contains(ids, hb.WorkerID) && hb.State == schemas.WorkerReady && slices.Contains(hb.Models, model) {
				ready++
			}
		}
		if ready == len(ids) {
			return s, nil
		}
		for _, c := range s.children {
			select {
			case <-c.done:
				return fail(fmt.Errorf("%s exited:\n%s", c.name, c.tail()))
			default:
			}
		}
		if err != nil && !errors.Is(err, registry.ErrNoRegistry) && wctx.Err() == nil {
			return fail(err)
		}
		select {
		case <-wctx.Done():
			return fail(fmt.Errorf("workers not ready: %w", wctx.Err()))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// words is deterministic filler text of n words (the same for every run).
func words(seed string, n int) string {
	vocab := strings.Fields("the service keeps every request in order and answers with care when the fleet " +
		"is busy a job waits in the queue until a worker has room then runs with its model loaded " +
		"policies say which tenant may use which model how long a reply may be and what to log")
	var b strings.Builder
	h := uint32(2166136261)
	for _, c := range seed {
		h = (h ^ uint32(c)) * 16777619
	}
	for i := range n {
		h = (h ^ uint32(i)) * 16777619
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(vocab[h%uint32(len(vocab))])
	}
	return b.String()
}

type turnSample struct {
	ttft           time.Duration
	runtimeTTFT    float64 // ms
	tokens, prompt int
	cached         int
	worker         string
	err            error
}

func runPrefixMode(ctx context.Context, o PrefixOptions, m PrefixMode, model, dir string) (PrefixRow, error) {
	st, err := startPrefixStack(ctx, o, m, model, dir)
	if err != nil {
		return PrefixRow{}, err
	}
	defer st.close()
	prod, err := bus.NewClient(st.nc, bus.WithTenant("bench"))
	if err != nil {
		return PrefixRow{}, err
	}
	zero := 0.0
	turn := func(msgs []schemas.Message, maxTokens int) (turnSample, string) {
		job := &schemas.JobRequest{Model: model, Messages: msgs, MaxTokens: maxTokens, Sampling: schemas.Sampling{Temperature: &zero}}
		start := time.Now()
		s, _, err := bus.SubmitStream(ctx, prod, st.nc, job, bus.StreamOptions{})
		if err != nil {
			return turnSample{err: err}, ""
		}
		defer s.Close()
		var ts turnSample
		for ev, err := range s.Events(ctx) {
			if err != nil {
				return turnSample{err: err}, ""
			}
			if ev.Token != nil {
				if ts.ttft == 0 {
					ts.ttft = time.Since(start)
				}
				continue
			}
			r := ev.Result
			if r.Status != schemas.StatusCompleted {
				return turnSample{err: fmt.Errorf("job %s %s", job.ID, r.Status)}, ""
			}
			ts.tokens, ts.prompt, ts.cached, ts.worker = r.Usage.CompletionTokens, r.Usage.PromptTokens, r.Usage.CachedTokens, r.WorkerID
			ts.runtimeTTFT = r.Timings.TTFTMs
			if ts.ttft == 0 {
				ts.ttft = time.Since(start)
			}
			return ts, r.Text
		}
		return turnSample{err: errors.New("stream ended without a terminal event")}, ""
	}
	// Warm-up: short unrelated chats, enough to reach every worker, so MLX's
	// first compiles are not timed. They share no prefix with the workload.
	var wg sync.WaitGroup
	for i := range 2 * o.Workers * o.Slots {
		wg.Go(func() {
			turn([]schemas.Message{{Role: "user", Content: "warm " + strconv.Itoa(i)}}, 4)
		})
	}
	wg.Wait()

	system := words("system", o.SystemWords)
	samples := make([][]turnSample, o.Conversations)
	sem := make(chan struct{}, o.Concurrency)
	t0 := time.Now()
	for c := range o.Conversations {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			msgs := []schemas.Message{{Role: "system", Content: system}}
			for t := range o.Turns {
				q := fmt.Sprintf("Question %d of conversation %d: what should happen next?", t+1, c+1)
				if t == 0 {
					q = "Here is my document: " + words("doc"+strconv.Itoa(c), o.DocWords) + "\n" + q
				}
				msgs = append(msgs, schemas.Message{Role: "user", Content: q})
				ts, text := turn(msgs, o.MaxTokens)
				samples[c] = append(samples[c], ts)
				if ts.err != nil {
					return
				}
				msgs = append(msgs, schemas.Message{Role: "assistant", Content: text})
			}
		})
	}
	wg.Wait()
	return summarizePrefix(m, samples, time.Since(t0)), nil
}

func summarizePrefix(m PrefixMode, convs [][]turnSample, wall time.Duration) PrefixRow {
	row := PrefixRow{Mode: m, ByWorker: map[string]int{}, WallS: wall.Seconds()}
	var ttft, rttft []float64
	var tokens, prompt, cached, follow, stuck int
	for _, turns := range convs {
		prev := ""
		for _, s := range turns {
			row.Requests++
			if s.err != nil {
				row.Errors++
				if row.FirstError == "" {
					row.FirstError = s.err.Error()
				}
				continue
			}
			ttft = append(ttft, ms(s.ttft))
			rttft = append(rttft, s.runtimeTTFT)
			tokens += s.tokens
			prompt += s.prompt
			cached += s.cached
			row.ByWorker[s.worker]++
			if prev != "" {
				follow++
				if s.worker == prev {
					stuck++
				}
			}
			prev = s.worker
		}
	}
	slices.Sort(ttft)
	row.TTFTP50, row.TTFTP95 = percentile(ttft, 50), percentile(ttft, 95)
	slices.Sort(rttft)
	row.RuntimeTTFTP50, row.RuntimeTTFTP95 = percentile(rttft, 50), percentile(rttft, 95)
	if n := len(ttft); n > 0 {
		row.Prompt, row.Cached = float64(prompt)/float64(n), float64(cached)/float64(n)
	}
	if prompt > 0 {
		row.HitRate = float64(cached) / float64(prompt)
	}
	if follow > 0 {
		row.Sticky = float64(stuck) / float64(follow)
	}
	if wall > 0 {
		row.TokensPerS = float64(tokens) / wall.Seconds()
	}
	return row
}

// WritePrefixTable prints the comparison.
func WritePrefixTable(w io.Writer, r *PrefixReport) {
	fmt.Fprintf(w, "\nmlx-serving bench prefix — %s, %d cores, model %s, %v\n\n", r.Machine.CPU, r.Machine.Cores, r.Model, r.Options)
	fmt.Fprintf(w, "%-14s %6s %10s %8s %13s %8s %8s %12s %12s %7s %7s %s\n", "mode", "reqs", "TTFT p50", "p95 ms", "runtime p50", "p95 ms", "tok/s", "prompt tok", "cached tok", "cached", "sticky", "jobs by worker")
	for _, row := range r.Rows {
		fmt.Fprintf(w, "%-14s %6d %10.1f %8.1f %13.1f %8.1f %8.0f %12.0f %12.0f %6.0f%% %6.0f%% %v\n", row.Mode.Name, row.Requests, row.TTFTP50, row.TTFTP95,
			row.RuntimeTTFTP50, row.RuntimeTTFTP95, row.TokensPerS, row.Prompt, row.Cached, 100*row.HitRate, 100*row.Sticky, row.ByWorker)
		if row.FirstError != "" {
			fmt.Fprintf(w, "  %d errors, first: %s\n", row.Errors, row.FirstError)
		}
	}
	fmt.Fprintf(w, "\nTTFT P50, neither ÷ cache+routing: %.1f× at the client, %.1f× in the runtime (target ≥ 3×)\n", r.TTFTSpeedup, r.RuntimeTTFTSpeedup)
}

// WritePrefixJSON writes the report.
func WritePrefixJSON(r *PrefixReport, path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
