package gateway

import (
	"encoding/json"
	"net/http"
	"strings"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// completionRequest is POST /v1/completions.
type completionRequest struct {
	samplingParams
	Prompt json.RawMessage `json:"prompt"`
	// Logprobs asks for each token's logprob and this many alternatives.
	Logprobs *int `json:"logprobs"`
}

func (g *Gateway) handleCompletions(w http.ResponseWriter, r *http.Request) {
	serve[completionRequest](g, w, r, endpointCompletions, completionFields, textFormat{})
}

func (req *completionRequest) toJob(defaultModel string) (*schemas.JobRequest, paramMap, *apiError) {
	job := &schemas.JobRequest{}
	pm := paramMap{maxTokens: "max_tokens", prompt: "prompt"}
	if aerr := req.apply(job, &pm, defaultModel); aerr != nil {
		return nil, pm, aerr
	}
	if req.Logprobs != nil {
		if aerr := checkTopLogprobs(*req.Logprobs, "logprobs"); aerr != nil {
			return nil, pm, aerr
		}
		job.Logprobs = req.Logprobs
	}
	raw := strings.TrimSpace(string(req.Prompt))
	if raw == "" || raw == "null" {
		return nil, pm, errInvalid("prompt", "The 'prompt' field is required.")
	}
	var one string
	if err := json.Unmarshal(req.Prompt, &one); err == nil {
		job.Prompt = one
		return job, pm, nil
	}
	var many []string
	if err := json.Unmarshal(req.Prompt, &many); err == nil {
		if len(many) != 1 {
			return nil, pm, errInvalid("prompt", "Only one prompt per request is supported.")
		}
		job.Prompt, pm.prompt = many[0], "prompt[0]"
		return job, pm, nil
	}
	return nil, pm, &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: "prompt", Code: "invalid_type",
		Message: "Invalid type for 'prompt': expected a string or an array of one string (token arrays are not supported)."}
}

// textFormat shapes text_completion bodies and events.
type textFormat struct{}

type textCompletion struct {
	ID      string       `json:"id"`
	Object  string       `json:"object"`
	Created int64        `json:"created"`
	Model   string       `json:"model"`
	Choices []textChoice `json:"choices"`
	Usage   any          `json:"usage,omitempty"`
}

type textChoice struct {
	Text         string          `json:"text"`
	Index        int             `json:"index"`
	Logprobs     json.RawMessage `json:"logprobs"`
	FinishReason *string         `json:"finish_reason"`
}

func (textFormat) idPrefix() string { return "cmpl-" }

func (textFormat) body(m meta, text, finish string, u usage, lp *logprobs) any {
	return textCompletion{ID: m.id, Object: "text_completion", Created: m.created, Model: m.model,
		Choices: []textChoice{{Text: text, Index: 0, Logprobs: lp.textJSON(), FinishReason: &finish}}, Usage: u}
}

func (textFormat) chunk(m meta, text string, finish *string) textCompletion {
	c := textCompletion{ID: m.id, Object: "text_completion", Created: m.created, Model: m.model,
		Choices: []textChoice{{Text: text, Index: 0, Logprobs: jsonNull, FinishReason: finish}}}
	if m.includeUsage {
		c.Usage = jsonNull
	}
	return c
}

// first is nil: completions have no role chunk.
func (textFormat) first(meta) any { return nil }

func (f textFormat) delta(m meta, text string, lp *logprobs) any {
	c := f.chunk(m, text, nil)
	c.Choices[0].Logprobs = lp.textJSON()
	return c
}

func (f textFormat) final(m meta, finish string) any { return f.chunk(m, "", &finish) }

func (textFormat) usage(m meta, u usage) any {
	return textCompletion{ID: m.id, Object: "text_completion", Created: m.created, Model: m.model,
		Choices: []textChoice{}, Usage: u}
}
