package gateway

import (
	"encoding/json"
	"net/http"
	"unicode/utf8"

	"github.com/mlx-serving/mlx-serving/bus"
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

// restLogprobs are the entries of ev.Rest, the end of the record's text a
// streamed client lacks (events lost on the way, a held stream): taken from
// the record's copy, whose entries' bytes spell the final attempt's text.
// Where they do not line up with the rest — a copy cut to its bound or
// lacking earlier attempts (logprobs_truncated), a rest that starts inside a
// token, entries that spell other bytes — the delta reports none rather than
// entries of other text. Before, a held stream's rest never had any (round 21,
// "Not fixed").
func (j *jobCall) restLogprobs(ev bus.Event) *logprobs {
	l := j.logprobsOf(nil, ev)
	res := ev.Result
	if l == nil || res == nil || res.LogprobsTruncated {
		return l
	}
	start, at := len(res.Text)-len(ev.Rest), 0
	k := 0
	for ; k < len(res.Logprobs) && at < start; k++ {
		at += len(res.Logprobs[k].Bytes)
	}
	if at != start {
		return l
	}
	rest := res.Logprobs[k:]
	spelt := make([]byte, 0, len(ev.Rest))
	for _, e := range rest {
		for _, b := range e.Bytes {
			spelt = append(spelt, byte(b))
		}
	}
	if string(spelt) == ev.Rest {
		l.entries = rest
	}
	return l
}

// checkTopLogprobs holds n to 0..20, naming param.
func checkTopLogprobs(n int, param string) *apiError {
	if n < 0 || n > maxTopLogprobs {
		return &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: param, Code: "invalid_value",
			Message: "'" + param + "' must be between 0 and 20."}
	}
	return nil
}

// finalLogprobs picks the entries for a whole answer from its terminal event:
// those that came with the stream's text when that text is the result's (the
// events' copy has every token's entry, even when the result's own copy was
// bounded or lacks a migrated job's first attempt), else the result's own.
func finalLogprobs(ev bus.Event, s *bus.JobStream) []schemas.TokenLogprob {
	res := ev.Result
	if ev.Rest == "" && !ev.Drop.Any() && s.Missed() == 0 && len(s.Logprobs()) >= len(res.Logprobs) {
		return s.Logprobs()
	}
	return res.Logprobs
}
