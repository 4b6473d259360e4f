package gateway

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// samplingParams are the request fields both endpoints share and honour. A field
// of the wrong JSON type is rejected naming the field; which fields a request may
// carry at all is fields.go's concern.
type samplingParams struct {
	Model     string `json:"model"`
	MaxTokens *int   `json:"max_tokens"`
	// The job's sampling fields decode straight into it, under the job's names:
	// temperature, top_p, seed, OpenAI's penalties and bias (applied per row by
	// the runtime), and top_k, min_p and repetition_penalty, extensions several
	// OpenAI-compatible servers accept. Stop and logprobs have OpenAI shapes of
	// their own: the shallower Stop below and each endpoint's Logprobs shadow
	// Sampling's, so those two stay nil here and apply sets them.
	schemas.Sampling
	Stop           json.RawMessage `json:"stop"`
	Stream         *bool           `json:"stream"`
	StreamOptions  *streamOptions  `json:"stream_options"`
	User           *string         `json:"user"`
	ResponseFormat *responseFormat `json:"response_format"`
	// N asks for that many choices, each a job of its own (choices.go).
	N *int `json:"n"`
}

type streamOptions struct {
	IncludeUsage *bool `json:"include_usage"`
}

type responseFormat struct {
	Type       string          `json:"type"`
	JSONSchema *jsonSchemaSpec `json:"json_schema"`
}

type jsonSchemaSpec struct {
	Name   string         `json:"name"`
	Schema map[string]any `json:"schema"`
	Strict *bool          `json:"strict"`
}

// decodeBody decodes a JSON object (a body readBody read) into v, answering
// malformed input in OpenAI's way; a field fields does not accept is refused
// naming it.
func decodeBody(body []byte, v any, fields fieldSet) *apiError {
	if err := json.Unmarshal(body, v); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			// The path names Go's embedded structs too (samplingParams and, within
			// it, schemas.Sampling); clients know only their fields.
			field := strings.TrimPrefix(strings.ReplaceAll(te.Field, "samplingParams.", ""), "Sampling.")
			if field == "" {
				return errInvalid("", "The request body must be a JSON object.")
			}
			return &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: field, Code: "invalid_type",
				Message: fmt.Sprintf("Invalid type for '%s': expected %s, got %s.", field, goTypeName(te.Type.String()), te.Value)}
		}
		return errInvalid("", "We could not parse the JSON body of your request: %v", err)
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(body, &obj); err != nil {
		return errInvalid("", "The request body must be a JSON object.")
	}
	return fields.check(obj, "")
}

// goTypeName names a Go destination type in JSON's words.
func goTypeName(t string) string {
	t = strings.TrimLeft(t, "*")
	switch {
	case strings.HasPrefix(t, "int"), strings.HasPrefix(t, "uint"):
		return "an integer"
	case strings.HasPrefix(t, "float"):
		return "a number"
	case t == "string":
		return "a string"
	case t == "bool":
		return "a boolean"
	case strings.HasPrefix(t, "[]"):
		return "an array"
	}
	return "an object"
}

// apply copies the shared fields into job and records how job paths map back.
func (p *samplingParams) apply(job *schemas.JobRequest, pm *paramMap, defaultModel string) *apiError {
	job.Model = p.Model
	if job.Model == "" {
		job.Model = defaultModel
	}
	if job.Model == "" {
		return errInvalid("model", "The 'model' field is required.")
	}
	if p.MaxTokens != nil {
		job.MaxTokens = *p.MaxTokens
		if *p.MaxTokens == 0 {
			// 0 would read as "absent" in the job; it is a value the client chose.
			return errInvalid(pm.maxTokens, "'%s' must be at least 1.", pm.maxTokens)
		}
	}
	if aerr := checkChoices(p.N); aerr != nil {
		return aerr
	}
	job.Sampling = p.Sampling
	if len(job.LogitBias) == 0 {
		job.LogitBias = nil
	}
	stop, isString, aerr := parseStop(p.Stop)
	if aerr != nil {
		return aerr
	}
	job.Stop, pm.stopString = stop, isString
	if p.User != nil && *p.User != "" {
		job.Metadata = map[string]string{"user": *p.User}
		pm.user = true
	}
	if p.StreamOptions != nil && !p.stream() {
		// OpenAI's answer too; taken silently, a client would wait for a
		// usage chunk that never comes (red team round 17, HTTP L2).
		return errInvalid("stream_options", "stream_options is only allowed when stream is true.")
	}
	if rf := p.ResponseFormat; rf != nil {
		if rf.JSONSchema != nil && rf.Type != "json_schema" {
			// Dropped without a word, the client would think its schema held.
			return errInvalid("response_format.json_schema", "response_format.json_schema is only read with type json_schema, not %q.", rf.Type)
		}
		switch rf.Type {
		case "", "text":
		case "json_object":
			job.JSONSchema = map[string]any{"type": "object"}
		case "json_schema":
			if rf.JSONSchema == nil || len(rf.JSONSchema.Schema) == 0 {
				return errInvalid("response_format.json_schema.schema", "response_format of type json_schema needs a non-empty json_schema.schema.")
			}
			job.JSONSchema = rf.JSONSchema.Schema // compiled in run, once the job's bounds hold
		default:
			return errInvalid("response_format.type", "Unknown response_format type %q; use text, json_object or json_schema.", rf.Type)
		}
	}
	return nil
}

func (p *samplingParams) stream() bool { return p.Stream != nil && *p.Stream }

func (p *samplingParams) choices() int {
	if p.N == nil {
		return 1
	}
	return *p.N
}

func (p *samplingParams) includeUsage() bool {
	return p.StreamOptions != nil && p.StreamOptions.IncludeUsage != nil && *p.StreamOptions.IncludeUsage
}

// parseStop accepts null, a string or an array of strings.
func parseStop(raw json.RawMessage) (stop []string, isString bool, aerr *apiError) {
	s := strings.TrimSpace(string(raw))
	if s == "" || s == "null" {
		return nil, false, nil
	}
	var one string
	if err := json.Unmarshal(raw, &one); err == nil {
		return []string{one}, true, nil
	}
	var many []string
	if err := json.Unmarshal(raw, &many); err == nil {
		return many, false, nil
	}
	return nil, false, &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: "stop", Code: "invalid_type",
		Message: "Invalid type for 'stop': expected a string or an array of strings."}
}
