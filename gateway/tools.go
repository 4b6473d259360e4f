package gateway

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"

	"github.com/xeipuuv/gojsonschema"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// Tool calls. The request's tools and tool_choice travel in the job; the runtime
// renders the tools through the model's chat template and, unless tool_choice is
// none, constrains decoding with a grammar (python/mlx_serving_runtime/tools.py) so
// that a call is always the text
//
//	<tool_call>
//	{"name": "NAME", "arguments": ARGS}
//	</tool_call>
//
// with ARGS valid against the function's parameters. This file checks tools at
// the edge and turns that text back into OpenAI's tool_calls, whole or as stream
// deltas.

const (
	callOpen  = "<tool_call>"
	callClose = "</tool_call>"
	maxTools  = 128
)

var toolNameRe = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// chatTool is one entry of the request's tools.
type chatTool struct {
	Type     string            `json:"type"`
	Function *chatToolFunction `json:"function"`
}

type chatToolFunction struct {
	Name        string          `json:"name"`
	Description *string         `json:"description"`
	Parameters  json.RawMessage `json:"parameters"`
	Strict      *bool           `json:"strict"` // arguments always follow the schema
}

// chatToolCall is a call an assistant message made (history) or the answer holds.
type chatToolCall struct {
	ID       string           `json:"id"`
	Type     string           `json:"type"`
	Function chatCallFunction `json:"function"`
}

type chatCallFunction struct {
	Name      string `json:"name"`
	Arguments string `json:"arguments"`
}

// toolCallDelta is one streamed piece of a call: the first names it (id, type,
// name), the rest append to its arguments.
type toolCallDelta struct {
	Index    int             `json:"index"`
	ID       string          `json:"id,omitempty"`
	Type     string          `json:"type,omitempty"`
	Function toolDeltaFields `json:"function"`
}

type toolDeltaFields struct {
	Name      string `json:"name,omitempty"`
	Arguments string `json:"arguments"`
}

// applyTools checks tools, tool_choice and parallel_tool_calls and copies them into
// the job. It returns whether the answer is parsed for calls (tools given and
// tool_choice not none).
func (req *chatRequest) applyTools(job *schemas.JobRequest) (bool, *apiError) {
	if len(req.Tools) > maxTools {
		return false, errInvalid("tools", "'tools' holds %d tools; at most %d are allowed.", len(req.Tools), maxTools)
	}
	names := map[string]bool{}
	for i, t := range req.Tools {
		p := fmt.Sprintf("tools[%d]", i)
		if t.Type != "function" {
			return false, errInvalid(p+".type", "'%s.type' must be \"function\", not %q.", p, t.Type)
		}
		f := t.Function
		if f == nil {
			return false, errInvalid(p+".function", "'%s.function' is required.", p)
		}
		if !toolNameRe.MatchString(f.Name) {
			return false, errInvalid(p+".function.name", "'%s.function.name' must be 1 to 64 letters, digits, underscores or dashes, not %q.", p, f.Name)
		}
		if names[f.Name] {
			return false, errInvalid(p+".function.name", "Two tools are named %q; names must be unique.", f.Name)
		}
		names[f.Name] = true
		tool := schemas.Tool{Type: "function", Function: schemas.ToolFunction{Name: f.Name}}
		if f.Description != nil {
			tool.Function.Description = *f.Description
		}
		params, aerr := toolParameters(f.Parameters, p+".function.parameters")
		if aerr != nil {
			return false, aerr
		}
		tool.Function.Parameters = params
		job.Tools = append(job.Tools, tool)
	}
	choice, aerr := parseToolChoice(req.ToolChoice, names)
	if aerr != nil {
		return false, aerr
	}
	job.ToolChoice = choice
	if req.ParallelToolCalls != nil && !*req.ParallelToolCalls {
		job.ParallelToolCalls = req.ParallelToolCalls
	}
	if len(req.Tools) == 0 {
		// none and auto without tools ask for what happens anyway: text.
		if choice != nil && choice.Mode == schemas.ToolChoiceRequired {
			return false, errInvalid("tool_choice", "'tool_choice' asks for a call but there are no 'tools'.")
		}
		return false, nil
	}
	return choice == nil || choice.Mode != schemas.ToolChoiceNone, nil
}

// toolParameters checks a function's parameters: absent, or a JSON Schema of an
// object (the arguments are one).
func toolParameters(raw json.RawMessage, param string) (map[string]any, *apiError) {
	s := bytes.TrimSpace(raw)
	if len(s) == 0 || bytes.Equal(s, []byte("null")) {
		return nil, nil
	}
	var params map[string]any
	if err := json.Unmarshal(s, &params); err != nil {
		return nil, errInvalid(param, "'%s' must be a JSON Schema object.", param)
	}
	if len(params) == 0 {
		return nil, nil
	}
	if t, ok := params["type"]; ok && t != "object" {
		return nil, errInvalid(param+".type", "'%s' must describe an object (type \"object\"): the arguments are one.", param)
	}
	if aerr := compileSchema(params, param); aerr != nil {
		return nil, aerr
	}
	return params, nil
}

// compileSchema refuses a schema that points outside itself or that a
// validator cannot compile, naming param.
func compileSchema(schema map[string]any, param string) *apiError {
	if aerr := localRefsOnly(schema, param); aerr != nil {
		return aerr
	}
	if _, err := gojsonschema.NewSchema(gojsonschema.NewGoLoader(schema)); err != nil {
		return errInvalid(param, "'%s' is not a valid JSON Schema: %v", param, err)
	}
	return nil
}

// localRefsOnly refuses a schema that points outside itself: a $ref that is not a
// fragment ("#/..."), or an id that would rebase one. Compiling such a schema would
// make the gateway read the files or URLs it names.
func localRefsOnly(v any, param string) *apiError {
	switch x := v.(type) {
	case map[string]any:
		for k, sub := range x {
			switch k {
			case "enum", "const", "default", "examples":
				continue // data, not schema
			case "$ref":
				if s, ok := sub.(string); ok && !strings.HasPrefix(s, "#") {
					return errInvalid(param, "'%s' may only refer inside itself ($ref \"#/...\"), not to %q.", param, s)
				}
			case "$id", "id":
				if _, ok := sub.(string); ok {
					return errInvalid(param, "'%s' may not set %s: its references stay inside it.", param, k)
				}
			}
			if aerr := localRefsOnly(sub, param); aerr != nil {
				return aerr
			}
		}
	case []any:
		for _, sub := range x {
			if aerr := localRefsOnly(sub, param); aerr != nil {
				return aerr
			}
		}
	}
	return nil
}

// parseToolChoice reads "none", "auto", "required" or {"type":"function",
// "function":{"name":...}} naming one of the tools; nil when absent.
func parseToolChoice(raw json.RawMessage, names map[string]bool) (*schemas.ToolChoice, *apiError) {
	s := bytes.TrimSpace(raw)
	if len(s) == 0 || bytes.Equal(s, []byte("null")) {
		return nil, nil
	}
	var mode string
	if json.Unmarshal(s, &mode) == nil {
		switch mode {
		case schemas.ToolChoiceAuto, schemas.ToolChoiceNone, schemas.ToolChoiceRequired:
			return &schemas.ToolChoice{Mode: mode}, nil
		}
		return nil, errInvalid("tool_choice", "'tool_choice' must be \"none\", \"auto\", \"required\" or a function, not %q.", mode)
	}
	var obj struct {
		Type     string `json:"type"`
		Function *struct {
			Name string `json:"name"`
		} `json:"function"`
	}
	if err := json.Unmarshal(s, &obj); err != nil {
		return nil, errInvalidType("tool_choice", "a string or an object")
	}
	if obj.Type != "function" {
		return nil, errInvalid("tool_choice.type", "'tool_choice.type' must be \"function\", not %q.", obj.Type)
	}
	if obj.Function == nil {
		return nil, errInvalid("tool_choice.function", "'tool_choice.function' is required.")
	}
	if !names[obj.Function.Name] {
		return nil, errInvalid("tool_choice.function.name", "'tool_choice' names %q, which is not one of the tools.", obj.Function.Name)
	}
	return &schemas.ToolChoice{Function: obj.Function.Name}, nil
}

func errInvalidType(param, want string) *apiError {
	e := errInvalid(param, "Invalid type for '%s': expected %s.", param, want)
	e.Code = "invalid_type"
	return e
}

// messageTools checks and copies a message's tool fields: a tool message answers a
// call by its id, an assistant message may carry the calls it made.
func messageTools(m chatMessage, out *schemas.Message, i int) *apiError {
	p := fmt.Sprintf("messages[%d]", i)
	if m.Role == "tool" {
		if m.ToolCallID == nil || *m.ToolCallID == "" {
			return errInvalid(p+".tool_call_id", "A tool message needs 'tool_call_id', the id of the call it answers.")
		}
		out.ToolCallID = *m.ToolCallID
	} else if m.ToolCallID != nil {
		return errInvalid(p+".tool_call_id", "'tool_call_id' belongs to tool messages only.")
	}
	if len(m.ToolCalls) == 0 {
		return nil
	}
	if m.Role != "assistant" {
		return errInvalid(p+".tool_calls", "'tool_calls' belongs to assistant messages only.")
	}
	for k, c := range m.ToolCalls {
		cp := fmt.Sprintf("%s.tool_calls[%d]", p, k)
		switch {
		case c.ID == "":
			return errInvalid(cp+".id", "'%s.id' is required.", cp)
		case c.Type != "function":
			return errInvalid(cp+".type", "'%s.type' must be \"function\".", cp)
		case c.Function.Name == "":
			return errInvalid(cp+".function.name", "'%s.function.name' is required.", cp)
		}
		out.ToolCalls = append(out.ToolCalls, schemas.ToolCall{ID: c.ID, Type: "function",
			Function: schemas.ToolCallFunction{Name: c.Function.Name, Arguments: c.Function.Arguments}})
	}
	return nil
}
