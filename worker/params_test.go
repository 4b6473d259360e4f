package worker

import (
	"encoding/json"
	"reflect"
	"testing"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// The job's OpenAI sampling fields reach the runtime unchanged, also on a resumed
// attempt (whose continuation the runtime counts toward the penalties).
// Mutation caught: dropping LogitBias from generateParams.
func TestGenerateParamsCarryPenaltiesAndBias(t *testing.T) {
	pres, freq := 0.5, -1.5
	bias := map[string]float64{"7": -100, "42": 3}
	for _, resume := range []*schemas.Resume{nil, {Text: "Hi", CompletionTokens: 1}} {
		p := generateParams(newJobRun(schemas.AssignedJob{Attempt: 1, Job: schemas.JobRequest{
			ID: "j", Model: "tiny", Prompt: "x", PresencePenalty: &pres, FrequencyPenalty: &freq, LogitBias: bias,
		}, Resume: resume}, "d1"))
		if p.PresencePenalty == nil || *p.PresencePenalty != pres || p.FrequencyPenalty == nil || *p.FrequencyPenalty != freq ||
			!reflect.DeepEqual(p.LogitBias, bias) {
			t.Fatalf("resume %v: params %+v", resume, p)
		}
	}
}

// Tools, the tool choice and parallel_tool_calls reach the runtime, and so do the
// tool fields of messages, also on a resumed attempt; the params stay valid.
// Mutation caught: dropping ToolChoice from generateParams.
func TestGenerateParamsCarryTools(t *testing.T) {
	no := false
	tools := []schemas.Tool{{Type: "function", Function: schemas.ToolFunction{Name: "f",
		Parameters: map[string]any{"type": "object"}}}}
	msgs := []schemas.Message{
		{Role: "user", Content: "hi"},
		{Role: "assistant", ToolCalls: []schemas.ToolCall{{ID: "c1", Type: "function",
			Function: schemas.ToolCallFunction{Name: "f", Arguments: "{}"}}}},
		{Role: "tool", Content: "ok", ToolCallID: "c1"},
	}
	choice := &schemas.ToolChoice{Function: "f"}
	for _, resume := range []*schemas.Resume{nil, {Text: "<tool_call>", CompletionTokens: 3}} {
		p := generateParams(newJobRun(schemas.AssignedJob{Attempt: 1, Job: schemas.JobRequest{
			ID: "j", Model: "tiny", Messages: msgs, Tools: tools, ToolChoice: choice, ParallelToolCalls: &no,
		}, Resume: resume}, "d1"))
		if !reflect.DeepEqual(p.Tools, tools) || p.ToolChoice != choice || p.ParallelToolCalls != &no ||
			!reflect.DeepEqual(p.Messages, msgs) {
			t.Fatalf("resume %v: params %+v", resume, p)
		}
		data, err := json.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := schemas.Validate(schemas.RuntimeGenerateParams, data); err != nil {
			t.Fatalf("resume %v: %v", resume, err)
		}
	}
}
