package worker

import (
	"encoding/json"
	"reflect"
	"strings"
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
			ID: "j", Model: "tiny", Prompt: "x", Sampling: schemas.Sampling{PresencePenalty: &pres, FrequencyPenalty: &freq, LogitBias: bias},
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

// setEvery gives every field of the struct v points to a value of its own, so a
// field added later is set too.
func setEvery(t *testing.T, v reflect.Value) {
	t.Helper()
	for i := range v.NumField() {
		f, n := v.Field(i), float64(i+1)
		switch f.Kind() {
		case reflect.Pointer:
			e := reflect.New(f.Type().Elem())
			switch e.Elem().Kind() {
			case reflect.Float64:
				e.Elem().SetFloat(n / 10)
			case reflect.Int, reflect.Int64:
				e.Elem().SetInt(int64(i + 1))
			default:
				t.Fatalf("setEvery: no value for %s", v.Type().Field(i).Name)
			}
			f.Set(e)
		case reflect.Map:
			m := reflect.MakeMap(f.Type())
			m.SetMapIndex(reflect.ValueOf("7"), reflect.ValueOf(n))
			f.Set(m)
		case reflect.Slice:
			f.Set(reflect.ValueOf([]string{"stop"}))
		default:
			t.Fatalf("setEvery: no value for %s", v.Type().Field(i).Name)
		}
		if f.IsZero() {
			t.Fatalf("setEvery: %s is still unset", v.Type().Field(i).Name)
		}
	}
}

// Every sampling field of the job reaches the runtime's params, whatever fields
// schemas.Sampling grows, also on a resumed attempt; and every params field that
// has a job field of the same JSON name carries its value.
// Mutation caught: generateParams copying fields one by one and missing one.
func TestGenerateParamsCarryEverySamplingField(t *testing.T) {
	var s schemas.Sampling
	setEvery(t, reflect.ValueOf(&s).Elem())
	no := false
	for _, resume := range []*schemas.Resume{nil, {Text: "Hi", CompletionTokens: 1}} {
		j := schemas.JobRequest{ID: "j", Model: "tiny", Prompt: "x", MaxTokens: 9, Sampling: s,
			JSONSchema: map[string]any{"type": "object"}, ParallelToolCalls: &no}
		p := generateParams(newJobRun(schemas.AssignedJob{Attempt: 1, Job: j, Resume: resume}, "d1"))
		st := reflect.TypeFor[schemas.Sampling]()
		for i := range st.NumField() {
			name := st.Field(i).Name
			if got, want := reflect.ValueOf(p.Sampling).Field(i).Interface(), reflect.ValueOf(j.Sampling).Field(i).Interface(); !reflect.DeepEqual(got, want) {
				t.Errorf("resume %v: %s is %v in the params, %v in the job", resume, name, got, want)
			}
		}
		jobFields := map[string]reflect.Value{}
		jv := reflect.ValueOf(j)
		for _, f := range reflect.VisibleFields(jv.Type()) {
			if tag, _, _ := strings.Cut(f.Tag.Get("json"), ","); tag != "" {
				jobFields[tag] = jv.FieldByIndex(f.Index)
			}
		}
		pv := reflect.ValueOf(*p)
		for _, f := range reflect.VisibleFields(pv.Type()) {
			tag, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			jf, ok := jobFields[tag]
			if tag == "" || !ok || (tag == "max_tokens" && resume != nil) {
				continue // a resumed attempt asks for what is left
			}
			if got := pv.FieldByIndex(f.Index).Interface(); !reflect.DeepEqual(got, jf.Interface()) {
				t.Errorf("resume %v: %s is %v in the params, %v in the job", resume, tag, got, jf.Interface())
			}
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
