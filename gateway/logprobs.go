package gateway

import (
	"encoding/json"
	"net/http"
	"unicode/utf8"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// maxTopLogprobs is the job schema's bound on alternatives per token (OpenAI's too).
const maxTopLogprobs = 20

// logprobs is what one body or chunk reports: nil when the request did not ask.
// offset is the length, in characters, of the answer's text before the first entry
// (completions' text_offset counts from it).
type logprobs struct {
	entries []schemas.TokenLogprob
	offset  int
}

// chatJSON is OpenAI's chat shape: {"content": [entry, ...]}.
func (l *logprobs) chatJSON() json.RawMessage {
	if l == nil {
		return jsonNull
	}
	entries := l.entries
	if entries == nil {
		entries = []schemas.TokenLogprob{}
	}
	raw, _ := json.Marshal(struct {
		Content []schemas.TokenLogprob `json:"content"`
	}{entries})
	return raw
}

// textJSON is the legacy completions shape: parallel arrays.
func (l *logprobs) textJSON() json.RawMessage {
	if l == nil {
		return jsonNull
	}
	out := struct {
		Tokens        []string             `json:"tokens"`
		TokenLogprobs []float64            `json:"token_logprobs"`
		TopLogprobs   []map[string]float64 `json:"top_logprobs"`
		TextOffset    []int                `json:"text_offset"`
	}{[]string{}, []float64{}, []map[string]float64{}, []int{}}
	off := l.offset
	for _, e := range l.entries {
		out.Tokens = append(out.Tokens, e.Token)
		out.TokenLogprobs = append(out.TokenLogprobs, e.Logprob)
		top := make(map[string]float64, len(e.TopLogprobs))
		for _, t := range e.TopLogprobs {
			top[t.Token] = t.Logprob
		}
		out.TopLogprobs = append(out.TopLogprobs, top)
		out.TextOffset = append(out.TextOffset, off)
		off += utf8.RuneCountInString(e.Token)
	}
	raw, _ := json.Marshal(out)
	return raw
}

// checkTopLogprobs holds n to 0..20, naming param.
func checkTopLogprobs(n int, param string) *apiError {
	if n < 0 || n > maxTopLogprobs {
		return &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: param, Code: "invalid_value",
			Message: "'" + param + "' must be between 0 and 20."}
	}
	return nil
}

// eventLogprobs gathers a job's logprobs from its token events, following rewinds
// (an attempt that started over), so a non-streamed answer has every token's entry
// even when the result's own copy was bounded or lacks a migrated job's first
// attempt. It is trusted only when its text is the result's text.
type eventLogprobs struct {
	text    []byte
	entries []schemas.TokenLogprob
	starts  []int // byte offset in text of the delta each entry came with
	broken  bool  // an event was missed
}

func (c *eventLogprobs) add(ev *eventView) {
	if ev.missed > 0 {
		c.broken = true
	}
	if ev.rewind {
		off := min(ev.offset, len(c.text))
		c.text = c.text[:off]
		n := len(c.starts)
		for n > 0 && c.starts[n-1] >= off {
			n--
		}
		c.entries, c.starts = c.entries[:n], c.starts[:n]
	}
	start := len(c.text)
	c.text = append(c.text, ev.delta...)
	for _, e := range ev.lps {
		c.entries = append(c.entries, e)
		c.starts = append(c.starts, start)
	}
}

// final picks the entries for the answer: the events' when they add up to the
// result's text, else the result's own (possibly bounded) copy.
func (c *eventLogprobs) final(res *schemas.ResultMsg) []schemas.TokenLogprob {
	if !c.broken && string(c.text) == res.Text && len(c.entries) >= len(res.Logprobs) {
		return c.entries
	}
	return res.Logprobs
}

type eventView struct {
	delta  string
	lps    []schemas.TokenLogprob
	offset int
	rewind bool
	missed int
}
