package gateway

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
)

// Every request field is listed here, per endpoint: nothing a client sends is
// silently ignored. A field is either honoured (it reaches the job or shapes the
// answer), or documented by OpenAI but not implemented by the fleet: then it is
// accepted only with its no-op value (n=1, presence_penalty=0, ...) and refused
// otherwise with 400 unsupported_parameter. Any other field, a typo included, is
// 400 unknown_parameter. JSON null counts as absent for listed fields.

// rule is what one field accepts.
type rule struct {
	// noop, when set, marks a field the fleet does not implement: only values for
	// which it returns true are accepted. nil: the field is honoured.
	noop func(json.RawMessage) bool
	// def describes the accepted no-op value, for the error message.
	def string
	// sub lists the keys of an object value (or of each element of an array
	// value, with each): nested objects are held to their own list.
	sub  fieldSet
	each bool
}

type fieldSet map[string]rule

var honoured = rule{}

func unsupported(def string, noop func(json.RawMessage) bool) rule {
	return rule{noop: noop, def: def}
}

// No-op tests on raw JSON values.
func isJSON(want string) func(json.RawMessage) bool {
	return func(raw json.RawMessage) bool {
		var a, b any
		return json.Unmarshal(raw, &a) == nil && json.Unmarshal([]byte(want), &b) == nil && equalJSON(a, b)
	}
}

func equalJSON(a, b any) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return bytes.Equal(x, y)
}

func isEmpty(raw json.RawMessage) bool { return isJSON("{}")(raw) || isJSON("[]")(raw) }

func never(json.RawMessage) bool { return false }

var (
	// streamOptionsFields: include_obfuscation pads events against side channels;
	// the gateway never pads, which is the value false.
	streamOptionsFields = fieldSet{
		"include_usage":       honoured,
		"include_obfuscation": unsupported("false", isJSON("false")),
	}
	responseFormatFields = fieldSet{
		"type": honoured,
		"json_schema": {sub: fieldSet{
			"name": honoured, "description": honoured, "schema": honoured,
			"strict": honoured, // the output is constrained to the schema either way
		}},
	}
	// samplingFields are honoured by both endpoints; top_k, min_p and
	// repetition_penalty are extensions other OpenAI-compatible servers accept too.
	samplingFields = fieldSet{
		"model": honoured, "max_tokens": honoured, "temperature": honoured, "top_p": honoured,
		"seed": honoured, "stop": honoured, "stream": honoured, "user": honoured,
		"stream_options":  {sub: streamOptionsFields},
		"response_format": {sub: responseFormatFields},
		"top_k":           honoured, "min_p": honoured, "repetition_penalty": honoured,
		"presence_penalty": honoured, "frequency_penalty": honoured, "logit_bias": honoured,
		"n": honoured, // n > 1: that many jobs, answered whole (choices.go)
	}
	// messageFields are the keys of one chat message. The assistant's own
	// message, sent back as history, may carry its empty extras.
	messageFields = fieldSet{
		"role": honoured,
		// A string, or text parts held to their keys: an unknown key in a
		// part was dropped without a word (red team round 17, HTTP L2).
		// (Other parts' payloads pass here: chat.go refuses those parts by type.)
		"content": {sub: fieldSet{"type": honoured, "text": honoured, "image_url": honoured, "input_audio": honoured, "file": honoured}, each: true},
		"name":    unsupported("null", never),
		// An assistant's calls sent back as history, and a tool's answer to one.
		"tool_calls":    {sub: toolCallFields, each: true},
		"tool_call_id":  honoured,
		"function_call": unsupported("null", never),
		"refusal":       unsupported("null", never),
		"audio":         unsupported("null", never),
		"annotations":   unsupported("[]", isEmpty),
	}
	toolCallFields = fieldSet{
		"id": honoured, "type": honoured,
		"function": {sub: fieldSet{"name": honoured, "arguments": honoured}},
	}
	// toolFields are one entry of tools: a function (tools.go checks the rest).
	toolFields = fieldSet{
		"type": honoured,
		"function": {sub: fieldSet{
			"name": honoured, "description": honoured, "parameters": honoured,
			"strict": honoured, // arguments are constrained to the schema either way
		}},
	}
	toolChoiceFields = fieldSet{
		"type": honoured, "function": {sub: fieldSet{"name": honoured}},
	}
	chatFields = merge(samplingFields, fieldSet{
		"messages":              {sub: messageFields, each: true},
		"max_completion_tokens": honoured,
		"metadata":              honoured,
		"logprobs":              honoured,
		"top_logprobs":          honoured,
		"tools":                 {sub: toolFields, each: true},
		"tool_choice":           {sub: toolChoiceFields}, // a mode string, or an object held to its list
		"parallel_tool_calls":   honoured,
		"functions":             unsupported("[]", isEmpty),
		"function_call":         unsupported(`"none"`, isJSON(`"none"`)),
		"store":                 unsupported("false", isJSON("false")),
		"modalities":            unsupported(`["text"]`, isJSON(`["text"]`)),
		"audio":                 unsupported("null", never),
		"prediction":            unsupported("null", never),
		"reasoning_effort":      unsupported("null", never),
		"service_tier":          unsupported("null", never),
		"safety_identifier":     unsupported("null", never),
		"prompt_cache_key":      unsupported("null", never),
		"verbosity":             unsupported("null", never),
		"web_search_options":    unsupported("null", never),
	})
	completionFields = merge(samplingFields, fieldSet{
		"prompt":   honoured,
		"echo":     unsupported("false", isJSON("false")),
		"suffix":   unsupported(`""`, isJSON(`""`)),
		"best_of":  unsupported("1", isJSON("1")),
		"logprobs": honoured, // an integer here: alternatives per token; 0 still returns logprobs
	})
)

func merge(sets ...fieldSet) fieldSet {
	out := fieldSet{}
	for _, s := range sets {
		for k, v := range s {
			out[k] = v
		}
	}
	return out
}

// check holds a decoded JSON object to the set; prefix names its place in the
// request ("" for the body). Keys are checked in sorted order, so the field an
// error names does not depend on map order.
func (fs fieldSet) check(obj map[string]json.RawMessage, prefix string) *apiError {
	keys := make([]string, 0, len(obj))
	for k := range obj {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		raw, param := obj[k], prefix+k
		r, ok := fs[k]
		if !ok {
			return &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: param, Code: "unknown_parameter",
				Message: fmt.Sprintf("Unrecognized request argument supplied: %s", param)}
		}
		if bytes.Equal(bytes.TrimSpace(raw), []byte("null")) {
			continue
		}
		if r.noop != nil && !r.noop(raw) {
			return &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: param, Code: "unsupported_parameter",
				Message: fmt.Sprintf("'%s' is not supported by this server; omit it or send %s.", param, r.def)}
		}
		if r.sub == nil {
			continue
		}
		if !r.each {
			var sub map[string]json.RawMessage
			if json.Unmarshal(raw, &sub) == nil {
				if e := r.sub.check(sub, param+"."); e != nil {
					return e
				}
			}
			continue
		}
		var elems []json.RawMessage
		_ = json.Unmarshal(raw, &elems)
		for i, el := range elems {
			var sub map[string]json.RawMessage
			if json.Unmarshal(el, &sub) == nil {
				if e := r.sub.check(sub, fmt.Sprintf("%s[%d].", param, i)); e != nil {
					return e
				}
			}
		}
	}
	return nil
}
