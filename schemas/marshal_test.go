package schemas

import (
	"encoding/json"
	"errors"
	"math"
	"testing"
	"time"
)

// A value JSON cannot carry is a ValidationError at its path, with the type's
// code. Mutation caught: Marshal returning json.Marshal's error as is: red.
func TestMarshalNamesTheValueJSONCannotCarry(t *testing.T) {
	t.Parallel()
	f := func(x float64) *float64 { return &x }
	late := time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)
	cases := []struct {
		name string
		job  JobRequest
		path string
	}{
		{"NaN temperature", JobRequest{Sampling: Sampling{Temperature: f(math.NaN())}}, "$.temperature"},
		{"infinite top_p", JobRequest{Sampling: Sampling{TopP: f(math.Inf(1))}}, "$.top_p"},
		{"infinite logit bias", JobRequest{Sampling: Sampling{LogitBias: map[string]float64{"5": math.Inf(-1)}}}, "$.logit_bias.5"},
		{"year past 9999", JobRequest{CreatedAt: &late}, "$.created_at"},
		{"in a tool's schema", JobRequest{Tools: []Tool{{Type: "function", Function: ToolFunction{Name: "f", Parameters: map[string]any{"x": math.NaN()}}}}}, "$.tools[0].function.parameters.x"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Marshal(Job, &c.job)
			var verr *ValidationError
			if !errors.As(err, &verr) || verr.Code != Code(Job) || len(verr.Violations) != 1 || verr.Violations[0].Path != c.path {
				t.Fatalf("Marshal: %v, want a %s ValidationError at %s", err, Code(Job), c.path)
			}
		})
	}
	ok := JobRequest{ID: "j", Model: "m", Prompt: "p", Sampling: Sampling{Temperature: f(0.5)}, CreatedAt: &time.Time{}}
	got, err := Marshal(Job, &ok)
	want, _ := json.Marshal(&ok)
	if err != nil || string(got) != string(want) {
		t.Fatalf("Marshal of an encodable job: %s, %v; want %s", got, err, want)
	}
}
