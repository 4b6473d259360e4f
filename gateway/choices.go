package gateway

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
)

// maxChoices bounds n: each choice is a job of its own.
const maxChoices = 8

// checkChoices holds n to 1..maxChoices; n > 1 is answered whole only.
func checkChoices(n *int, stream bool) *apiError {
	switch {
	case n == nil || *n == 1:
		return nil
	case *n < 1 || *n > maxChoices:
		return &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: "n", Code: "invalid_value",
			Message: fmt.Sprintf("'n' must be between 1 and %d.", maxChoices)}
	case stream:
		return &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: "n", Code: "unsupported_parameter",
			Message: "'n' > 1 is not supported with stream: true by this server; omit stream or send n: 1."}
	}
	return nil
}

// runChoices answers a request for n > 1 choices: n jobs, submitted together so
// the dispatcher can hand them to one worker, where they decode as rows of one
// batch. Choice i is job i; a seed becomes seed+i, so choices differ yet the whole
// answer is reproducible. Usage counts the prompt once (as OpenAI does) and the
// completions of every choice. If one choice fails, the others are cancelled and
// the request fails with its error.
func (g *Gateway) runChoices(w http.ResponseWriter, r *http.Request, spec runSpec, now time.Time, waitCtx context.Context) {
	base := spec.job
	// The request holds one tenant slot already; each further job takes one more.
	for range spec.n - 1 {
		release, ok := g.limits.acquire(base.Tenant)
		if !ok {
			g.refuse(w, spec.endpoint, base.Tenant, &apiError{Status: http.StatusTooManyRequests, Type: typeRateLimit,
				Code: codeTenantQueue, RetryAfter: g.cfg.RetryAfter,
				Message: fmt.Sprintf("Tenant %q has too many jobs queued or running for %d choices; retry later.", base.Tenant, spec.n)})
			return
		}
		defer release()
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
			job.ID = bus.NewJobID()
			job.ReplyTo = bus.ReplySubject(job.Tenant, job.ID)
			if base.Seed != nil {
				s := *base.Seed + int64(i)
				job.Seed = &s
			}
		}
		stream, _, err := bus.SubmitStream(waitCtx, g.producer, g.nc, &job, g.cfg.Stream)
		if err != nil {
			cancelAll(0, "a sibling choice could not be submitted")
			if r.Context().Err() != nil {
				return
			}
			g.fail(w, spec.endpoint, fromSubmit(err, spec.params, g.cfg.RetryAfter))
			return
		}
		defer stream.Close()
		g.metrics.submitted.inc(spec.endpoint)
		ids = append(ids, job.ID)
		m := meta{id: spec.format.idPrefix() + base.ID, created: now.Unix(), model: job.Model}
		calls = append(calls, &jobCall{g: g, w: w, r: r, spec: spec, job: &job, stream: stream, waitCtx: waitCtx, meta: m})
	}
	w.Header().Set("X-Mlx-Job-Id", strings.Join(ids, ","))

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
	writeJSON(w, http.StatusOK, mergeChoices(bodies))
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
