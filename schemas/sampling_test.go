package schemas

import (
	"encoding/json"
	"reflect"
	"testing"
)

// fullSampling sets every Sampling field.
func fullSampling(t *testing.T) Sampling {
	temp, topP, minP, rep, pres, freq := 0.7, 0.9, 0.05, 1.1, 0.5, -0.25
	topK, lp := 40, 3
	seed := int64(42)
	s := Sampling{Temperature: &temp, TopP: &topP, TopK: &topK, MinP: &minP, RepetitionPenalty: &rep,
		PresencePenalty: &pres, FrequencyPenalty: &freq, LogitBias: map[string]float64{"7": -100, "42": 2.5},
		Logprobs: &lp, Seed: &seed, Stop: []string{"\n\n", "</s>"}}
	v := reflect.ValueOf(s)
	for i := range v.NumField() {
		if v.Field(i).IsZero() {
			t.Fatalf("fullSampling leaves %s unset: set it here and in the golden documents", v.Type().Field(i).Name)
		}
	}
	return s
}

// Embedding Sampling in JobRequest and GenerateParams leaves their JSON byte for
// byte as it was when each type listed the fields itself (the goldens were encoded
// by that code): same names, same order, same omitempty. Both still validate, and
// decode back to what was encoded.
// Mutation caught: a Sampling field whose tag loses omitempty, or embedding it at
// another place in either struct.
func TestSamplingJSONUnchanged(t *testing.T) {
	t.Parallel()
	no := false
	s := fullSampling(t)
	job := JobRequest{ID: "job-1", Model: "tiny", Prompt: "Once upon a time", MaxTokens: 64, Sampling: s,
		JSONSchema: map[string]any{"type": "object"}, ParallelToolCalls: &no,
		Priority: "high", Tenant: "acme", ReplyTo: "replies.x", Metadata: map[string]string{"user": "u"}}
	params := GenerateParams{RequestID: "job-1.1", Model: "tiny", Prompt: "Once upon a time", MaxTokens: 64, Sampling: s,
		JSONSchema: map[string]any{"type": "object"}, ParallelToolCalls: &no, Continuation: "Hi"}
	cases := []struct {
		typ    Type
		v      any
		golden string
		fresh  func() any
	}{
		{Job, job, `{"id":"job-1","model":"tiny","prompt":"Once upon a time","max_tokens":64,"temperature":0.7,"top_p":0.9,"top_k":40,"min_p":0.05,"repetition_penalty":1.1,"presence_penalty":0.5,"frequency_penalty":-0.25,"logit_bias":{"42":2.5,"7":-100},"logprobs":3,"seed":42,"stop":["\n\n","\u003c/s\u003e"],"json_schema":{"type":"object"},"parallel_tool_calls":false,"priority":"high","tenant":"acme","reply_to":"replies.x","metadata":{"user":"u"}}`,
			func() any { return new(JobRequest) }},
		{RuntimeGenerateParams, params, `{"request_id":"job-1.1","model":"tiny","prompt":"Once upon a time","max_tokens":64,"temperature":0.7,"top_p":0.9,"top_k":40,"min_p":0.05,"repetition_penalty":1.1,"presence_penalty":0.5,"frequency_penalty":-0.25,"logit_bias":{"42":2.5,"7":-100},"logprobs":3,"seed":42,"stop":["\n\n","\u003c/s\u003e"],"json_schema":{"type":"object"},"parallel_tool_calls":false,"continuation":"Hi"}`,
			func() any { return new(GenerateParams) }},
	}
	for _, c := range cases {
		out, err := json.Marshal(c.v)
		if err != nil {
			t.Fatal(err)
		}
		if string(out) != c.golden {
			t.Errorf("%s: encoding changed:\ngot  %s\nwant %s", c.typ, out, c.golden)
		}
		if err := Validate(c.typ, out); err != nil {
			t.Errorf("%s: %v", c.typ, err)
		}
		back := c.fresh()
		if err := json.Unmarshal([]byte(c.golden), back); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(reflect.ValueOf(back).Elem().Interface(), c.v) {
			t.Errorf("%s: decoding the golden gives %+v, want %+v", c.typ, back, c.v)
		}
	}
	// An empty Sampling adds nothing to either object.
	for _, c := range []struct {
		v    any
		want string
	}{
		{JobRequest{ID: "j", Model: "m", Prompt: "p", ReplyTo: "r"}, `{"id":"j","model":"m","prompt":"p","reply_to":"r"}`},
		{GenerateParams{RequestID: "j.1", Model: "m", Prompt: "p"}, `{"request_id":"j.1","model":"m","prompt":"p"}`},
	} {
		out, err := json.Marshal(c.v)
		if err != nil {
			t.Fatal(err)
		}
		if string(out) != c.want {
			t.Errorf("got %s, want %s", out, c.want)
		}
	}
}
