package schemas

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
)

// refSchema builds {"$defs":{d0..dn}, "$ref":"#/$defs/d0"} where d_i is
// entry(i) (referencing d_{i+1} somehow) and d_n is a string.
func refSchema(n int, entry func(i int) string) string {
	var b strings.Builder
	b.WriteString(`{"$defs":{`)
	for i := range n {
		fmt.Fprintf(&b, `"d%d":%s,`, i, entry(i))
	}
	fmt.Fprintf(&b, `"d%d":{"type":"string"}},"$ref":"#/$defs/d0"}`, n)
	return b.String()
}

func objectChain(i int) string {
	return fmt.Sprintf(`{"type":"object","properties":{"a":{"$ref":"#/$defs/d%d"}},"required":["a"]}`, i+1)
}

func aliasChain(i int) string { return fmt.Sprintf(`{"$ref":"#/$defs/d%d"}`, i+1) }

// schemaReasons validates a job whose json_schema is schema and returns its
// violations as "path: reason".
func schemaReasons(t *testing.T, schema string) []string {
	t.Helper()
	return reasonsOf(t, Job, depthJob(`"prompt":"x","json_schema":`+schema))
}

func reasonsOf(t *testing.T, typ Type, doc []byte) []string {
	t.Helper()
	err := Validate(typ, doc)
	if err == nil {
		return nil
	}
	verr, ok := err.(*ValidationError)
	if !ok {
		t.Fatalf("not a ValidationError: %v", err)
	}
	var out []string
	for _, v := range verr.Violations {
		out = append(out, v.Path+": "+v.Reason)
	}
	return out
}

func wantOne(t *testing.T, got []string, path, reason string) {
	t.Helper()
	if len(got) != 1 || !strings.HasPrefix(got[0], path+": ") || !strings.Contains(got[0], reason) {
		t.Fatalf("violations %q, want one at %s saying %q", got, path, reason)
	}
}

// TestRefChainsRefused: red team round 8's N1 schemas, a flat $defs chain of
// 950 objects each referencing the next and a 2,500-long alias chain (JSON
// depth 5, grammar depth thousands: llguidance overflowed its native stack on
// them), are too deep at $.json_schema, in the job and in the runtime's
// params. Mutation caught: follow returning 0 (refs not followed).
func TestRefChainsRefused(t *testing.T) {
	t.Parallel()
	for name, s := range map[string]string{
		"objects950":  refSchema(950, objectChain),
		"aliases2500": refSchema(2500, aliasChain),
	} {
		wantOne(t, schemaReasons(t, s), "$.json_schema", "more than 64 levels deep")
		params := []byte(`{"request_id":"r-1","model":"tiny","prompt":"x","json_schema":` + s + `}`)
		if got := pathsOf(t, RuntimeGenerateParams, params); len(got) != 1 || got[0] != "$.json_schema" {
			t.Errorf("%s: runtime.generate.params violations %v", name, got)
		}
	}
}

// TestRefDepthBoundary: an alias chain is as deep as its refs are long. The
// root is level 1 and $defs/d0 level 3, each alias one more: n aliases reach
// level n+3, so 61 pass and 62 do not. Mutation caught: a ref hop not counted
// as a level (62 passes).
func TestRefDepthBoundary(t *testing.T) {
	t.Parallel()
	if got := schemaReasons(t, refSchema(61, aliasChain)); got != nil {
		t.Fatalf("61 aliases (64 levels) refused: %v", got)
	}
	wantOne(t, schemaReasons(t, refSchema(62, aliasChain)), "$.json_schema", "64 levels deep")
}

// TestRefPointerForms: refs are followed however they name their target: a
// percent-escaped pointer, ~1/~0 escapes, "definitions", a $anchor, or the
// schema's own $id before "#" (llguidance resolves all of these). Mutation
// caught: ~1 unescaping removed, or anchors not resolved.
func TestRefPointerForms(t *testing.T) {
	t.Parallel()
	for name, s := range map[string]string{
		"percent": strings.ReplaceAll(refSchema(100, objectChain), `"#/$defs/d`, `"#/%24defs/d`),
		"tilde": strings.Replace(strings.ReplaceAll(strings.ReplaceAll(strings.ReplaceAll(refSchema(100, objectChain),
			`"#/$defs/d`, `"#/definitions/x~1~0d`), `"$defs"`, `"definitions"`), `,"d`, `,"x/~d`), `{"d0"`, `{"x/~d0"`, 1),
		"id": strings.Replace(strings.ReplaceAll(refSchema(100, objectChain), `"#/$defs/d`, `"http://x/s#/$defs/d`),
			`{`, `{"$id":"http://x/s",`, 1),
	} {
		got := schemaReasons(t, s)
		if len(got) != 1 || !strings.Contains(got[0], "64 levels deep") {
			t.Errorf("%s: violations %q, want too deep", name, got)
		}
	}
	var b strings.Builder
	b.WriteString(`{"$defs":{`)
	for i := range 100 {
		fmt.Fprintf(&b, `"d%d":{"$anchor":"a%d","type":"object","properties":{"a":{"$ref":"#a%d"}}},`, i, i, i+1)
	}
	b.WriteString(`"d100":{"$anchor":"a100","type":"string"}},"$ref":"#a0"}`)
	if got := schemaReasons(t, b.String()); len(got) != 1 || !strings.Contains(got[0], "64 levels deep") {
		t.Errorf("anchor chain: violations %q, want too deep", got)
	}
}

// TestRecursiveSchemaAllowed: recursion (a tree of nodes, a schema whose
// field refers to the root) is legal: a ref back to a schema on the path
// counts no further. Mutation caught: the onPath check removed (the walk
// loops until the depth bound and refuses the tree).
func TestRecursiveSchemaAllowed(t *testing.T) {
	t.Parallel()
	for _, s := range []string{
		`{"$defs":{"node":{"type":"object","properties":{"name":{"type":"string"},"children":{"type":"array","items":{"$ref":"#/$defs/node"}}},"required":["name"]}},"$ref":"#/$defs/node"}`,
		`{"type":"object","properties":{"v":{"type":"integer"},"next":{"$ref":"#"}}}`,
		`{"$defs":{"a":{"anyOf":[{"type":"null"},{"$ref":"#/$defs/b"}]},"b":{"type":"array","items":{"$ref":"#/$defs/a"}}},"$ref":"#/$defs/a"}`,
	} {
		if got := schemaReasons(t, s); got != nil {
			t.Errorf("recursive schema %s refused: %v", s, got)
		}
	}
}

// TestRefDAGLinear: a schema where each def references the next twice has
// 2^n paths, and as many refs once each is expanded (refused); the walk
// visits each node a bounded number of times (memo per ref target, counts
// saturating at their bound), not once per path. Mutation caught: the memo
// lookup removed (2,345 visits before the count passes its bound).
func TestRefDAGLinear(t *testing.T) {
	t.Parallel()
	s := refSchema(20, func(i int) string {
		return fmt.Sprintf(`{"type":"object","properties":{"a":{"$ref":"#/$defs/d%d"},"b":{"$ref":"#/$defs/d%d"}}}`, i+1, i+1)
	})
	wantOne(t, schemaReasons(t, s), "$.json_schema", "more than 256 $refs")
	var v any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatal(err)
	}
	w := schemaWalker{root: v}
	w.height(v, 1, true)
	if w.visits > 500 { // 114 with the memo, 2,345 without
		t.Fatalf("%d visits for a schema of about 200 nodes", w.visits)
	}
}

// allOfRefs is red team round 9's schema: $defs.P holds `patterns`
// patternProperties, and n properties are each an allOf of a $ref to P and
// a maxProperties (llguidance compiles P anew for each allOf: 20 of them over
// 64 patterns compiled for 24 s).
func allOfRefs(patterns, n int) string {
	pp := make([]string, patterns)
	for i := range pp {
		pp[i] = fmt.Sprintf(`"^([a-z]{0,12}[0-9]){0,12}z%d$":{"type":"string"}`, i)
	}
	props := make([]string, n)
	for j := range props {
		props[j] = fmt.Sprintf(`"k%d":{"allOf":[{"$ref":"#/$defs/P"},{"type":"object","maxProperties":%d}]}`, j, j+1)
	}
	return `{"$defs":{"P":{"type":"object","patternProperties":{` + strings.Join(pp, ",") +
		`}}},"type":"object","properties":{` + strings.Join(props, ",") + `}}`
}

// TestRefTargetCountedPerRef: a ref's target counts its patterns (and refs)
// again at every ref followed to it. Red team round 9's schema is refused at
// 2 refs (128 patterns), in the job and in the runtime's params; a small def
// referenced 10 times stays allowed up to the bound (6 patterns x 10), one
// more ref is refused. Mutation caught: follow's tally not added (targets
// counted once: 66 and 128 pass).
func TestRefTargetCountedPerRef(t *testing.T) {
	t.Parallel()
	s := allOfRefs(64, 2)
	wantOne(t, schemaReasons(t, s), "$.json_schema", "more than 64 patterns")
	params := []byte(`{"request_id":"r-1","model":"tiny","prompt":"x","json_schema":` + s + `}`)
	wantOne(t, reasonsOf(t, RuntimeGenerateParams, params), "$.json_schema", "more than 64 patterns")
	if got := schemaReasons(t, allOfRefs(6, 10)); got != nil {
		t.Fatalf("a 6-pattern def referenced 10 times refused: %v", got)
	}
	wantOne(t, schemaReasons(t, allOfRefs(6, 11)), "$.json_schema", "more than 64 patterns")
	// Refs inside a target count again too: 2 refs to a def holding 200 refs.
	inner := make([]string, 200)
	for i := range inner {
		inner[i] = fmt.Sprintf(`"p%d":{"$ref":"#/$defs/s"}`, i)
	}
	refs := `{"$defs":{"s":{"type":"string"},"R":{"type":"object","properties":{` + strings.Join(inner, ",") +
		`}}},"type":"object","properties":{"a":{"$ref":"#/$defs/R"},"b":{"$ref":"#/$defs/R"}}}`
	wantOne(t, schemaReasons(t, refs), "$.json_schema", "more than 256 $refs")
}

// TestRefAndPatternCounts: the refs and patterns of json_schema and every
// tool's parameters together are bounded; the field where a count passes its
// bound is reported. Red team round 8's N2: 500 patternProperties compiled
// for 73 s. Mutation caught: the patternProperties count removed.
func TestRefAndPatternCounts(t *testing.T) {
	t.Parallel()
	props := func(n int, f func(i int) string) string {
		parts := make([]string, n)
		for i := range parts {
			parts[i] = f(i)
		}
		return strings.Join(parts, ",")
	}
	refs := func(n int) string {
		return `{"$defs":{"s":{"type":"string"}},"type":"object","properties":{` +
			props(n, func(i int) string { return fmt.Sprintf(`"p%d":{"$ref":"#/$defs/s"}`, i) }) + `}}`
	}
	pp := func(n int) string {
		return `{"type":"object","patternProperties":{` +
			props(n, func(i int) string { return fmt.Sprintf(`"^x%d[a-z]*$":{"type":"string"}`, i) }) + `}}`
	}
	if got := schemaReasons(t, refs(MaxSchemaRefs)); got != nil {
		t.Fatalf("%d refs refused: %v", MaxSchemaRefs, got)
	}
	wantOne(t, schemaReasons(t, refs(MaxSchemaRefs+1)), "$.json_schema", "more than 256 $refs")
	if got := schemaReasons(t, pp(MaxSchemaPatterns)); got != nil {
		t.Fatalf("%d patternProperties refused: %v", MaxSchemaPatterns, got)
	}
	wantOne(t, schemaReasons(t, pp(500)), "$.json_schema", "more than 64 patterns")
	mixed := `{"type":"object","propertyNames":{"maxLength":3},"properties":{` +
		props(MaxSchemaPatterns, func(i int) string { return fmt.Sprintf(`"p%d":{"type":"string","pattern":"^a"}`, i) }) + `}}`
	wantOne(t, schemaReasons(t, mixed), "$.json_schema", "more than 64 patterns")
	// Shared across fields: 40 patterns in json_schema and 40 in the second
	// tool pass each alone, not together.
	job := depthJob(`"messages":[{"role":"user","content":"x"}],"json_schema":` + pp(40) +
		`,"tools":[{"type":"function","function":{"name":"a"}},{"type":"function","function":{"name":"b","parameters":` + pp(40) + `}}]`)
	wantOne(t, reasonsOf(t, Job, job), "$.tools[1].function.parameters", "more than 64 patterns")
}

// TestRecursiveCountsInOneOrder: a recursive schema's counts depend on the
// order refs are met (a tally memoized while a cycle was cut), so the walk
// takes members in sorted order, as schema_bounds.py does: this vector (a
// random recursive schema on which the two once disagreed) is refused every
// time, as the runtime refuses it (python/tests/test_schemas.py runs the same
// vector). Mutation caught: Go's map order (it passes on some runs of 50).
func TestRecursiveCountsInOneOrder(t *testing.T) {
	t.Parallel()
	doc, err := os.ReadFile("testdata/runtime.generate.params/invalid/json-schema-recursive-ref-order.json")
	if err != nil {
		t.Fatal(err)
	}
	for range 50 {
		wantOne(t, reasonsOf(t, RuntimeGenerateParams, doc), "$.json_schema", "more than 64 patterns")
	}
}
