package schemas

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
)

// chain is a JSON Schema nesting objects levels deep ({"type":"string"} is 1),
// whose innermost description is full of brackets.
func chain(levels int) string {
	return strings.Repeat(`{"type":"array","items":`, levels-1) +
		`{"type":"string","description":"[[[{{{ not nesting: \"]]] }}"}` + strings.Repeat(`}`, levels-1)
}

func depthJob(field string) []byte {
	return []byte(`{"id":"01J9ZQ3W6N1S2T3V4W5X6Y7Z8A","model":"tiny","tenant":"acme","reply_to":"replies.acme.x",` + field + `}`)
}

// pathsOf returns the violation paths of Validate's answer; nil when valid.
func pathsOf(t *testing.T, typ Type, doc []byte) []string {
	t.Helper()
	err := Validate(typ, doc)
	if err == nil {
		return nil
	}
	var verr *ValidationError
	if !errors.As(err, &verr) {
		t.Fatalf("not a ValidationError: %v", err)
	}
	if verr.Code != CodeInvalidRequest && typ == Job {
		t.Errorf("code %q, want %q", verr.Code, CodeInvalidRequest)
	}
	var out []string
	for _, v := range verr.Violations {
		out = append(out, v.Path)
		if strings.HasSuffix(v.Path, "parameters") || v.Path == "$.json_schema" {
			if !strings.Contains(v.Reason, "64 levels") {
				t.Errorf("reason %q does not name the bound", v.Reason)
			}
		}
	}
	return out
}

// TestSchemaDepthBound: a json_schema exactly MaxSchemaDepth deep is a valid job,
// one level more is invalid at $.json_schema, and the brackets inside its strings
// count for nothing (the chain's innermost string holds more brackets than the
// slack). Mutation caught: the depth check removed from Validate (the 65-deep job
// passes), or strings counted as levels.
func TestSchemaDepthBound(t *testing.T) {
	t.Parallel()
	if got := pathsOf(t, Job, depthJob(`"prompt":"x","json_schema":`+chain(MaxSchemaDepth))); got != nil {
		t.Fatalf("%d-deep json_schema refused: %v", MaxSchemaDepth, got)
	}
	got := pathsOf(t, Job, depthJob(`"prompt":"x","json_schema":`+chain(MaxSchemaDepth+1)))
	if len(got) != 1 || got[0] != "$.json_schema" {
		t.Fatalf("%d-deep json_schema: violations %v, want exactly $.json_schema", MaxSchemaDepth+1, got)
	}
	// Arrays count as objects do.
	arrays := strings.Repeat("[", MaxSchemaDepth) + strings.Repeat("]", MaxSchemaDepth)
	if got := pathsOf(t, Job, depthJob(`"prompt":"x","json_schema":{"enum":`+arrays+`}`)); len(got) != 1 || got[0] != "$.json_schema" {
		t.Fatalf("object holding %d nested arrays: violations %v, want $.json_schema", MaxSchemaDepth, got)
	}
}

// TestToolParametersDepthBound: each tool's parameters are bounded like
// json_schema, reported at that tool's path, in the runtime's params as in the
// job. Mutation caught: the tools loop removed from schemaViolations.
func TestToolParametersDepthBound(t *testing.T) {
	t.Parallel()
	tools := func(levels int) string {
		return `"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"a"}},` +
			`{"type":"function","function":{"name":"b","parameters":` + chain(levels) + `}}]`
	}
	if got := pathsOf(t, Job, depthJob(tools(MaxSchemaDepth))); got != nil {
		t.Fatalf("%d-deep parameters refused: %v", MaxSchemaDepth, got)
	}
	want := "$.tools[1].function.parameters"
	if got := pathsOf(t, Job, depthJob(tools(MaxSchemaDepth+1))); len(got) != 1 || got[0] != want {
		t.Fatalf("job: violations %v, want exactly %s", got, want)
	}
	params := []byte(`{"request_id":"r-1","model":"tiny",` + tools(MaxSchemaDepth+1) + `}`)
	if got := pathsOf(t, RuntimeGenerateParams, params); len(got) != 1 || got[0] != want {
		t.Fatalf("runtime.generate.params: violations %v, want exactly %s", got, want)
	}
}

// TestSchemaDepthWithOtherViolations: a deep schema in a job that breaks its
// schema elsewhere too reports both, sorted by path.
func TestSchemaDepthWithOtherViolations(t *testing.T) {
	t.Parallel()
	got := pathsOf(t, Job, depthJob(`"prompt":"x","temperature":9,"json_schema":`+chain(3000)))
	if strings.Join(got, " ") != "$.json_schema $.temperature" {
		t.Fatalf("violations %v, want $.json_schema and $.temperature", got)
	}
}

// TestSchemaBoundsMatchSchemas: the bounds the Python runtime reads
// (runtime.generate.params.json's x-max-depth, x-max-refs, x-max-patterns,
// x-max-nodes) and the ones job.json documents are MaxSchemaDepth,
// MaxSchemaRefs, MaxSchemaPatterns and MaxSchemaNodes. Mutation caught: either file's number changed alone.
func TestSchemaBoundsMatchSchemas(t *testing.T) {
	t.Parallel()
	var doc struct {
		Properties map[string]map[string]any `json:"properties"`
	}
	raw, _ := Raw(RuntimeGenerateParams)
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	for key, want := range map[string]int{"x-max-depth": MaxSchemaDepth, "x-max-refs": MaxSchemaRefs, "x-max-patterns": MaxSchemaPatterns, "x-max-nodes": MaxSchemaNodes} {
		if got, _ := doc.Properties["json_schema"][key].(float64); int(got) != want {
			t.Errorf("runtime.generate.params.json json_schema %s %v, want %d", key, got, want)
		}
	}
	raw, _ = Raw(Job)
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	desc, _ := doc.Properties["json_schema"]["description"].(string)
	for _, want := range []string{
		fmt.Sprintf("at most %d levels", MaxSchemaDepth),
		fmt.Sprintf("at most %d $refs", MaxSchemaRefs),
		fmt.Sprintf("at most %d patterns", MaxSchemaPatterns),
		fmt.Sprintf("at most %d values", MaxSchemaNodes),
	} {
		if !strings.Contains(desc, want) {
			t.Errorf("job.json json_schema description %q does not say %q", desc, want)
		}
	}
}
