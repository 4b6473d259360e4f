package schemas

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

// enumOf is a schema of exactly n JSON values: {"enum":[0,...]} with n-2
// members (the object and the array count one each).
func enumOf(n int) string {
	return `{"enum":[` + strings.TrimSuffix(strings.Repeat("0,", n-2), ",") + `]}`
}

// TestSchemaNodesBoundary: a schema of MaxSchemaNodes values is accepted, one
// more value is refused at the field's path, in the job and in the runtime's
// params. Red team round 11's F6: a 0.95 MB {"enum":[{},{},...]} passed every
// other bound (depth 2, no refs, no patterns) and took each runtime from 146 MB
// to 1.16 GB. Mutation caught: the scalar's tally{nodes: 1} made tally{}
// (enums of scalars count nothing: the MaxSchemaNodes+1 schema passes).
func TestSchemaNodesBoundary(t *testing.T) {
	t.Parallel()
	if got := schemaReasons(t, enumOf(MaxSchemaNodes)); got != nil {
		t.Fatalf("a schema of %d values refused: %v", MaxSchemaNodes, got)
	}
	over := enumOf(MaxSchemaNodes + 1)
	wantOne(t, schemaReasons(t, over), "$.json_schema", fmt.Sprintf("more than %d values", MaxSchemaNodes))
	params := []byte(`{"request_id":"r-1","model":"tiny","prompt":"x","json_schema":` + over + `}`)
	wantOne(t, reasonsOf(t, RuntimeGenerateParams, params), "$.json_schema", fmt.Sprintf("more than %d values", MaxSchemaNodes))
	// The attack's shape: empty objects, each a value.
	objs := `{"enum":[` + strings.TrimSuffix(strings.Repeat("{},", MaxSchemaNodes), ",") + `]}`
	wantOne(t, schemaReasons(t, objs), "$.json_schema", "values")
}

// TestSchemaNodesAcrossFields: json_schema and every tool's parameters count
// together (they compile into one grammar), and the field where the count
// passes the bound is reported. Mutation caught: check's c.nodes sum removed
// (each field alone is within the bound).
func TestSchemaNodesAcrossFields(t *testing.T) {
	t.Parallel()
	half := MaxSchemaNodes / 2
	tool := func(name string, n int) string {
		return `{"type":"function","function":{"name":"` + name + `","parameters":` + enumOf(n) + `}}`
	}
	job := depthJob(`"messages":[{"role":"user","content":"x"}],"json_schema":` + enumOf(half) +
		`,"tools":[` + tool("a", half) + `,` + tool("b", 2) + `]`)
	wantOne(t, reasonsOf(t, Job, job), "$.tools[1].function.parameters", fmt.Sprintf("more than %d values", MaxSchemaNodes))
	ok := depthJob(`"messages":[{"role":"user","content":"x"}],"json_schema":` + enumOf(half) +
		`,"tools":[` + tool("a", half) + `]`)
	if got := reasonsOf(t, Job, ok); got != nil {
		t.Fatalf("%d values over two fields refused: %v", MaxSchemaNodes, got)
	}
}

// TestSchemaNodesDefsAndRefs: the root's $defs count where they sit even when
// no ref reaches them (they are decoded and held all the same), and a ref's
// target counts again at every ref to it (llguidance compiles what each ref
// reaches). Mutation caught: defsHeight's node sum dropped (unreferenced defs
// pass), or tally.add's node sum dropped (60 refs to one def pass).
func TestSchemaNodesDefsAndRefs(t *testing.T) {
	t.Parallel()
	unused := `{"$defs":{"big":` + enumOf(MaxSchemaNodes) + `},"type":"string"}`
	wantOne(t, schemaReasons(t, unused), "$.json_schema", "values")
	props := make([]string, 60)
	for i := range props {
		props[i] = fmt.Sprintf(`"p%d":{"$ref":"#/$defs/e"}`, i)
	}
	refs := `{"$defs":{"e":` + enumOf(200) + `},"type":"object","properties":{` + strings.Join(props, ",") + `}}`
	wantOne(t, schemaReasons(t, refs), "$.json_schema", "values")
	if got := schemaReasons(t, strings.Replace(refs, enumOf(200), enumOf(100), 1)); got != nil {
		t.Fatalf("60 refs to a def of 100 values refused: %v", got)
	}
}

// TestSchemaNodesWalkStops: the walk of an enum of a million members stops
// once the count passes its bound, so refusing it costs MaxSchemaNodes steps.
// Mutation caught: the overCount check in height's array loop removed.
func TestSchemaNodesWalkStops(t *testing.T) {
	t.Parallel()
	var v any
	if err := json.Unmarshal([]byte(enumOf(1_000_000)), &v); err != nil {
		t.Fatal(err)
	}
	w := schemaWalker{root: v}
	w.height(v, 1, true)
	if w.tooMany != "nodes" || w.visits > MaxSchemaNodes+10 {
		t.Fatalf("tooMany %q after %d visits, want nodes within %d", w.tooMany, w.visits, MaxSchemaNodes+10)
	}
}
