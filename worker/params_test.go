package worker

import (
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
