package gateway

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// maxChoices bounds n: each choice is a job of its own.
const maxChoices = 8

// checkChoices holds n to 1..maxChoices.
func checkChoices(n *int) *apiError {
	if n != nil && (*n < 1 || *n > maxChoices) {
		return &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: "n", Code: "invalid_value",
			Message: fmt.Sprintf("'n' must be between 1 and %d.", maxChoices)}
	}
	return nil
}

// runChoices answers a request for n > 1 choices: n jobs, submitted together so
// the dispatcher can hand them to one worker, where they decode as rows of one
// batch. Choice i is job i; a seed becomes seed+i, so choices differ yet the whole
// answer is reproducible. Usage counts the prompt once (as OpenAI does) and the
// completions of every choice. If one choice fails, the others are cancelled and
// the request fails with its error.
func (g *Gateway) runChoices(w http.ResponseWriter, r *http.Request, base *schemas.JobRequest, spec runSpec, now time.Time, waitCtx context.Context) {
	// The request holds one tenant slot already; each further job takes one
	// more — unless a key names a job held after its first try's client left:
	// the retry joins that hold, as serve does for choice 0. Before, the exact
	// retry of a keyed n > 1 request was refused 429 by its own held choices
	// (round 22's second pass, F3).
	for i := 1; i < spec.n; i++ {
		if spec.key != "" {
			if held := g.holds.join(keyedJobID(base.Tenant, spec.key, spec.fingerprint, i)); held != nil {
				defer held.done()
				continue
			}
		}
		release, ok := g.limits.acquire(base.Tenant)
		if !ok {
			g.refuse(w, spec.endpoint, base.Tenant, &apiError{Status: http.StatusTooManyRequests, Type: typeRateLimit,
				Code: codeTenantQueue, RetryAfter: g.cfg.RetryAfter,
				Message: fmt.Sprintf("Tenant %q has too many jobs queued or running for %d choices; retry later.", base.Tenant, spec.n)})
			return
		}
		if !spec.slot.also(release) {
			defer release()
		}
	}
	calls := make([]*jobCall, 0, spec.n)
	cancelAll := func(from int, reason string) {
		for _, c := range calls[from:] {
			c.cancel(reason)
		}
	}
	ids := make([]string, 0, spec.n)
	for i := range spec.n {
		job := *base
		if i > 0 {
			job.ID = jobID(job.Tenant, spec.key, spec.fingerprint, i)
			job.ReplyTo = bus.ReplySubject(job.Tenant, job.ID)
			if base.Seed != nil {
				s := *base.Seed + int64(i)
				job.Seed = &s
			}
		}
		stream, watched, err := g.submit(waitCtx, &job, spec)
		if err != nil {
			cancelAll(0, "a sibling choice could not be submitted")
			g.cancelUnsure(r.Context(), &job, err, "submit failed or its client left before it was acknowledged", spec.slot)
			if r.Context().Err() != nil {
				return
			}
			g.fail(w, spec.endpoint, fromSubmit(err, spec.params, g.cfg.RetryAfter))
			return
		}
		defer stream.Close()
		g.obs.JobSubmitted(spec.endpoint)
		ids = append(ids, job.ID)
		m := meta{id: spec.format.idPrefix() + base.ID, created: now.Unix(), model: job.Model, includeUsage: spec.stream && spec.includeUsage}
		cspec := spec
		cspec.format = choiceFormat(spec.format)
		calls = append(calls, &jobCall{g: g, w: w, r: r, spec: cspec, job: submitted(&job), stream: stream, waitCtx: waitCtx, meta: m, watched: watched})
	}
	w.Header().Set("X-Mlx-Job-Id", strings.Join(ids, ","))
	if spec.stream {
		streamChoices(calls)
		return
	}

	bodies := make([]any, 0, spec.n)
	for i, c := range calls {
		body, aerr, answer := c.await()
		if !answer || aerr != nil {
			cancelAll(i+1, "a sibling choice failed")
			if answer {
				g.fail(w, spec.endpoint, aerr)
			}
			return
		}
		bodies = append(bodies, body)
	}
	g.answer(w, mergeChoices(bodies), ids[0]) // not base.ID: base (its messages) must not live on while the choices run (held.go)
}

// mergeChoices joins one-choice bodies into one body with choices indexed 0..n-1
// and usage summed over the completions (the prompt counted once).
func mergeChoices(bodies []any) any {
	switch first := bodies[0].(type) {
	case chatCompletion:
		for i, b := range bodies[1:] {
			c := b.(chatCompletion)
			ch := c.Choices[0]
			ch.Index = i + 1
			first.Choices = append(first.Choices, ch)
			first.Usage.CompletionTokens += c.Usage.CompletionTokens
		}
		first.Usage.TotalTokens = first.Usage.PromptTokens + first.Usage.CompletionTokens
		return first
	case textCompletion:
		u, _ := first.Usage.(usage)
		for i, b := range bodies[1:] {
			c := b.(textCompletion)
			ch := c.Choices[0]
			ch.Index = i + 1
			first.Choices = append(first.Choices, ch)
			cu, _ := c.Usage.(usage)
			u.CompletionTokens += cu.CompletionTokens
		}
		u.TotalTokens = u.PromptTokens + u.CompletionTokens
		first.Usage = u
		return first
	}
	return bodies[0]
}

// streamChoices streams every choice at once, each chunk naming its choice's
// index, as OpenAI does; one [DONE] ends them all. A choice that fails ends the
// stream with its error and cancels the others.
func streamChoices(calls []*jobCall) {
	c0 := calls[0]
	g, w, spec, m := c0.g, c0.w, c0.spec, c0.meta
	f := spec.format
	sse := newSSEWriter(w, g.writeTimeout)
	type item struct {
		i   int
		ev  bus.Event
		err error
	}
	items := make(chan item)
	quit := make(chan struct{})
	defer close(quit)
	for i, c := range calls {
		go func() {
			for {
				ev, err := c.next()
				select {
				case items <- item{i, ev, err}:
				case <-quit:
					return
				}
				if err != nil || ev.Result != nil {
					return
				}
			}
		}()
	}
	finished := make([]bool, len(calls))
	cancelRest := func(reason string) {
		for i, c := range calls {
			if !finished[i] {
				c.cancel(reason)
			}
		}
	}
	clientLeft := func(err error) {
		cancelRest(g.clientGone(err, c0.job.ID)) // keyed jobs are held, not cancelled: cancelJob
	}
	send := func(v any, i int) bool {
		for _, e := range each(v) {
			if err := sse.send(withIndex(e, i)); err != nil {
				clientLeft(err)
				return false
			}
		}
		return true
	}
	begin := func() bool {
		if sse.started {
			return true
		}
		if f.first(m) == nil {
			sse.start()
			return true
		}
		for i := range calls {
			if !send(f.first(m), i) {
				return false
			}
		}
		return true
	}
	failWith := func(e *apiError) {
		if !sse.started {
			g.fail(w, spec.endpoint, e)
			return
		}
		_ = sse.send(e.body())
	}
	var total usage
	tick := time.NewTicker(keepAliveEvery)
	defer tick.Stop()
	for left := len(calls); left > 0; {
		var it item
		select {
		case it = <-items:
		case <-tick.C:
			// A held choice keeps the stream alive while its job is quiet too.
			if slices.ContainsFunc(calls, func(c *jobCall) bool { return c.held }) {
				if err := sse.keepAlive(); err != nil {
					clientLeft(err)
					return
				}
			}
			continue
		}
		c := calls[it.i]
		if it.err != nil {
			finished[it.i] = true
			e := c.abandon(it.err) // cancels this choice's job
			cancelRest("a sibling choice failed")
			if e != nil {
				failWith(e)
			}
			return
		}
		if it.ev.Token != nil {
			out, lp, ok := c.delta(it.ev)
			if !ok {
				if c.held {
					if err := sse.keepAlive(); err != nil {
						clientLeft(err)
						return
					}
				}
				continue
			}
			if !begin() || !send(c.spec.format.delta(m, out, lp), it.i) {
				return
			}
			continue
		}
		res := it.ev.Result
		finished[it.i] = true
		if res.Status != schemas.StatusCompleted {
			cancelRest("a sibling choice failed")
			failWith(c.failure(res))
			return
		}
		if !begin() {
			return
		}
		end, e := c.closing(it.ev)
		if e != nil {
			cancelRest("a sibling choice's stream diverged")
			_ = sse.send(e.body())
			return
		}
		if !send(end, it.i) {
			return
		}
		u := usageOf(res)
		if left == len(calls) {
			total.PromptTokens, total.PromptTokensDetails = u.PromptTokens, u.PromptTokensDetails
		}
		total.CompletionTokens += u.CompletionTokens
		left--
	}
	total.TotalTokens = total.PromptTokens + total.CompletionTokens
	if m.includeUsage {
		if err := sse.send(f.usage(m, total)); err != nil {
			return
		}
	}
	_ = sse.done()
}

// withIndex sets the choice index of a one-choice chunk.
func withIndex(v any, i int) any {
	switch c := v.(type) {
	case chatChunk:
		if len(c.Choices) == 1 {
			c.Choices[0].Index = i
		}
		return c
	case textCompletion:
		if len(c.Choices) == 1 {
			c.Choices[0].Index = i
		}
		return c
	}
	return v
}
