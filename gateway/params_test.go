package gateway

import (
	"net/http"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
)

// A field of the wrong JSON type is refused naming the field as the client sent
// it, whether it decodes into the request, its samplingParams or the
// schemas.Sampling embedded there; logprobs keeps each endpoint's OpenAI type
// (a boolean in chat, an integer in completions), not the job's.
// Mutation caught: dropping the "Sampling." strip in decodeBody.
func TestWrongTypeNamesTheField(t *testing.T) {
	tb := startBus(t, jsprov.Options{})
	_, srv := newTestGateway(t, tb, nil)
	msgs := `"messages":[{"role":"user","content":"hi"}]`
	for _, c := range []struct{ path, body, param string }{
		{"/v1/chat/completions", `{"model":"` + testModel + `",` + msgs + `,"temperature":"hot"}`, "temperature"},
		{"/v1/chat/completions", `{"model":"` + testModel + `",` + msgs + `,"top_k":1.5}`, "top_k"},
		{"/v1/chat/completions", `{"model":"` + testModel + `",` + msgs + `,"logit_bias":[1]}`, "logit_bias"},
		{"/v1/chat/completions", `{"model":"` + testModel + `",` + msgs + `,"seed":"s"}`, "seed"},
		{"/v1/chat/completions", `{"model":"` + testModel + `",` + msgs + `,"max_tokens":"x"}`, "max_tokens"},
		{"/v1/chat/completions", `{"model":"` + testModel + `",` + msgs + `,"logprobs":3}`, "logprobs"},
		{"/v1/completions", `{"model":"` + testModel + `","prompt":"p","frequency_penalty":"x"}`, "frequency_penalty"},
		{"/v1/completions", `{"model":"` + testModel + `","prompt":"p","logprobs":true}`, "logprobs"},
	} {
		resp := postJSON(t, srv.URL+c.path, c.body)
		expectError(t, resp, http.StatusBadRequest, c.param, "invalid_type")
	}
}
