package schemas

import (
	"fmt"
	"strconv"
)

// MaxSchemaDepth bounds how deep a job's json_schema, and each of its tools'
// function.parameters, may nest objects and arrays: the value itself is level 1,
// so {"type":"string"} is 1 level deep and {"items":{"type":"string"}} 2. Real
// schemas nest a handful of levels; the runtime's JSON reader, its validator and
// the grammar compiler each recurse once per level, and a schema a thousand
// levels deep made the runtime process die of RecursionError, failing every
// job that ran on it. Validate refuses deeper ones at every edge (producer
// client, gateway, dispatcher, worker) as a violation at the field's path.
// job.json and runtime.generate.params.json say so ("x-max-depth" in the
// latter, which the Python runtime reads; TestMaxSchemaDepthMatchesSchemas
// keeps them equal to this constant).
const MaxSchemaDepth = 64

// depthViolations returns a violation for each schema-carrying field of the
// decoded job (or runtime.generate.params) v that nests deeper than
// MaxSchemaDepth. It walks only those fields, once, and stops at the first
// level past the bound, so it costs two map lookups for a job without them.
func depthViolations(v any) []Violation {
	doc, ok := v.(map[string]any)
	if !ok {
		return nil
	}
	var out []Violation
	if s, ok := doc["json_schema"]; ok && deeperThan(s, MaxSchemaDepth) {
		out = append(out, depthViolation("$.json_schema"))
	}
	tools, _ := doc["tools"].([]any)
	for i, t := range tools {
		tool, _ := t.(map[string]any)
		fn, _ := tool["function"].(map[string]any)
		if p, ok := fn["parameters"]; ok && deeperThan(p, MaxSchemaDepth) {
			out = append(out, depthViolation("$.tools["+strconv.Itoa(i)+"].function.parameters"))
		}
	}
	return out
}

func depthViolation(path string) Violation {
	return Violation{Path: path, Reason: fmt.Sprintf("nests objects and arrays more than %d levels deep", MaxSchemaDepth)}
}

// deeperThan reports whether v, decoded JSON, nests objects and arrays more
// than limit levels deep. Strings are leaves whatever brackets they hold.
func deeperThan(v any, limit int) bool {
	switch x := v.(type) {
	case map[string]any:
		if limit == 0 {
			return true
		}
		for _, e := range x {
			if deeperThan(e, limit-1) {
				return true
			}
		}
	case []any:
		if limit == 0 {
			return true
		}
		for _, e := range x {
			if deeperThan(e, limit-1) {
				return true
			}
		}
	}
	return false
}
