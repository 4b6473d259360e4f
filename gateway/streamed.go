package gateway

import (
	"strings"
	"time"
	"unicode/utf8"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A streamed answer: its loop, what each token event adds to the client's
// text, and how the stream ends (jobCall's other half is in jobs.go).

// streamed answers with Server-Sent Events as tokens arrive. The 200 is sent with
// the first event, so a job that fails before producing text gets a real status.
func (j *jobCall) streamed() {
	sse := newSSEWriter(j.w, j.g.writeTimeout)
	f, m := j.spec.format, j.meta
	begin := func() error {
		if sse.started {
			return nil
		}
		if first := f.first(m); first != nil {
			return sse.send(first)
		}
		sse.start()
		return nil
	}
	// Events are read on a goroutine of their own, so a stream held after
	// lost events keeps alive while the job is quiet too (a retry's backoff,
	// a prefill), not only when an event comes (round 21's final review).
	type item struct {
		ev  bus.Event
		err error
	}
	items := make(chan item)
	quit := make(chan struct{})
	defer close(quit)
	go func() {
		for {
			ev, err := j.next()
			select {
			case items <- item{ev, err}:
			case <-quit:
				return
			}
			if err != nil || ev.Result != nil {
				return
			}
		}
	}()
	tick := time.NewTicker(keepAliveEvery)
	defer tick.Stop()
	for {
		var ev bus.Event
		var err error
		select {
		case it := <-items:
			ev, err = it.ev, it.err
		case <-tick.C:
			if j.held {
				if err := sse.keepAlive(); err != nil {
					j.clientLeft(err)
					return
				}
			}
			continue
		}
		if err != nil {
			e := j.abandon(err)
			switch {
			case e == nil:
			case !sse.started:
				j.g.fail(j.w, j.spec.endpoint, e)
			default:
				// Mid-stream the status is sent; OpenAI clients raise on an error event.
				_ = sse.send(e.body())
			}
			return
		}
		if ev.Token != nil {
			out, lp, ok := j.delta(ev)
			if !ok {
				if j.held {
					if err := sse.keepAlive(); err != nil {
						j.clientLeft(err)
						return
					}
				}
				continue
			}
			if err := begin(); err != nil {
				j.clientLeft(err)
				return
			}
			if err := sendEach(sse, f.delta(m, out, lp)); err != nil {
				j.clientLeft(err)
				return
			}
			continue
		}
		res := ev.Result
		if res.Status != schemas.StatusCompleted {
			e := j.failure(res)
			if !sse.started {
				j.g.fail(j.w, j.spec.endpoint, e)
				return
			}
			_ = sse.send(e.body())
			return
		}
		if err := begin(); err != nil {
			j.clientLeft(err)
			return
		}
		end, e := j.closing(ev)
		if e != nil {
			_ = sse.send(e.body())
			return
		}
		if err := sendEach(sse, end); err != nil {
			j.clientLeft(err)
			return
		}
		if m.includeUsage {
			if err := sse.send(f.usage(m, usageOf(res))); err != nil {
				j.clientLeft(err)
				return
			}
		}
		if err := sse.done(); err != nil {
			j.clientLeft(err)
		}
		return
	}
}

// delta returns what a token event adds to the client's text, if anything.
// The stream swallows what a restarted attempt regenerates; where it cannot
// (Drop: the attempt generated other text) the client's text cannot be taken
// back, so nothing more goes out and the terminal ends the stream with an
// error (closing).
func (j *jobCall) delta(ev bus.Event) (string, *logprobs, bool) {
	if ev.Drop.Any() && !j.diverged {
		j.diverged = true
		j.g.log.Warn().Str("job_id", j.job.ID).Int("attempt", ev.Attempt).
			Msg("a restarted attempt regenerated different text; the stream stops and the result is whole")
	}
	if ev.Missed > 0 && !j.diverged {
		j.held = true
	}
	out := ev.Token.Delta
	if j.diverged || j.held || out == "" {
		return "", nil, false
	}
	j.sent = append(j.sent, out...)
	return out, j.logprobsOf(ev.Token.Logprobs, ev), true
}

// logprobsOf reports entries that came with ev's text.
func (j *jobCall) logprobsOf(entries []schemas.TokenLogprob, ev bus.Event) *logprobs {
	if !j.spec.logprobs {
		return nil
	}
	return &logprobs{entries: entries, offset: ev.CharOffset}
}

// closing is how a completed job's stream ends: the end of the result's text
// the client lacks (deltas lost on the way, or a terminal read from RESULTS),
// sent from the record's whole text, then the format's final chunk. The rest's
// logprob entries come from the record's copy where they line up with it
// (restLogprobs). When the client holds text that is not the result's
// beginning, which cannot be taken back, it is the stream_diverged error.
func (j *jobCall) closing(ev bus.Event) (events, *apiError) {
	if j.held {
		// What the client holds is sent, not the stream's text with its hole:
		// a Drop the stream reports after the hold (a retry that started over
		// regenerates over the hole) takes back nothing the client has (the
		// second pass of round 21).
		rest, ok := strings.CutPrefix(ev.Result.Text, string(j.sent))
		if !ok {
			j.g.log.Warn().Str("job_id", j.job.ID).Int("missed", j.stream.Missed()).
				Msg("streamed text differs from the job's result text")
			return nil, errStreamDiverged(j.job.ID)
		}
		// The bus's offset counts the stream's text, which a retry that
		// started over rewound; the client's is what it was sent.
		ev.Rest, ev.CharOffset = rest, utf8.RuneCount(j.sent)
	} else if j.diverged || ev.Drop.Any() {
		if !j.diverged {
			j.g.log.Warn().Str("job_id", j.job.ID).Int("missed", j.stream.Missed()).
				Msg("streamed text differs from the job's result text")
		}
		return nil, errStreamDiverged(j.job.ID)
	}
	var out events
	if ev.Rest != "" {
		out = append(out, each(j.spec.format.delta(j.meta, ev.Rest, j.restLogprobs(ev)))...)
	}
	return append(out, each(j.spec.format.final(j.meta, finishReason(ev.Result)))...), nil
}
