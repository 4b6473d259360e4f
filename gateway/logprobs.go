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
