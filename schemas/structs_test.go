package schemas

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

// The Go structs of every schema, checked field by field against the JSON schemas
// (bus messages and the runtime's), so neither side of the contract drifts.

// schemaDoc resolves a node's $ref across the embedded files.
type schemaDoc struct {
	t    *testing.T
	docs map[string]map[string]any // file name -> parsed schema
}

func newSchemaDoc(t *testing.T) *schemaDoc {
	raws, err := readAll(files)
	if err != nil {
		t.Fatal(err)
	}
	sd := &schemaDoc{t: t, docs: map[string]map[string]any{}}
	for name, raw := range raws {
		var m map[string]any
		if err := json.Unmarshal(raw, &m); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		sd.docs[name] = m
	}
	return sd
}

// resolve follows $ref (possibly several) from node, read in file; it returns the
// target node and the file it lives in.
func (sd *schemaDoc) resolve(file string, node map[string]any) (string, map[string]any) {
	for {
		ref, ok := node["$ref"].(string)
		if !ok {
			return file, node
		}
		target, frag, _ := strings.Cut(ref, "#")
		if target != "" {
			file = target
		}
		cur, ok := sd.docs[file]
		if !ok {
			sd.t.Fatalf("$ref %q: no file %s", ref, file)
		}
		for _, part := range strings.Split(strings.Trim(frag, "/"), "/") {
			if part == "" {
				continue
			}
			next, ok := cur[part].(map[string]any)
			if !ok {
				sd.t.Fatalf("$ref %q: nothing at %s", ref, part)
			}
			cur = next
		}
		node = cur
	}
}

var toolChoiceType = reflect.TypeFor[ToolChoice]()

// compare checks schema node (at path, in file) against Go type typ: same
// properties as json tags, required exactly when not omitempty, matching JSON
// types, a description on every property and additionalProperties false on
// every object with properties.
func (sd *schemaDoc) compare(path, file string, node map[string]any, typ reflect.Type) {
	t := sd.t
	file, node = sd.resolve(file, node)
	for typ.Kind() == reflect.Pointer {
		typ = typ.Elem()
	}
	jsonType, _ := node["type"].(string)
	want := map[reflect.Kind]string{
		reflect.String: "string", reflect.Int: "integer", reflect.Int64: "integer",
		reflect.Float64: "number", reflect.Bool: "boolean", reflect.Slice: "array",
		reflect.Map: "object", reflect.Struct: "object",
	}[typ.Kind()]
	if typ == timeType {
		want = "string"
	}
	if typ == toolChoiceType {
		// Encoded by its own MarshalJSON as one of two shapes: a oneOf in the schema.
		if _, ok := node["oneOf"].([]any); !ok {
			t.Errorf("%s: ToolChoice wants a oneOf of its string and object forms", path)
		}
		return
	}
	if _, isConst := node["const"]; isConst && typ.Kind() == reflect.String {
		jsonType = "string"
	}
	if _, isConst := node["const"].(bool); isConst && jsonType == "" && typ.Kind() == reflect.Bool {
		jsonType = "boolean"
	}
	if jsonType != want {
		t.Errorf("%s: schema type %q, Go type %s wants %q", path, jsonType, typ, want)
		return
	}
	switch {
	case typ == timeType:
	case typ.Kind() == reflect.Slice:
		items, _ := node["items"].(map[string]any)
		if items == nil {
			t.Errorf("%s: array without items", path)
			return
		}
		sd.compare(path+"[]", file, items, typ.Elem())
	case typ.Kind() == reflect.Struct:
		if node["additionalProperties"] != false {
			t.Errorf("%s: additionalProperties is not false", path)
		}
		props, _ := node["properties"].(map[string]any)
		required := map[string]bool{}
		if req, ok := node["required"].([]any); ok {
			for _, r := range req {
				required[r.(string)] = true
			}
		}
		seen := map[string]bool{}
		// Promoted fields are the object's own, as encoding/json flattens an
		// untagged embedded struct (JobRequest's and GenerateParams' Sampling).
		for _, f := range reflect.VisibleFields(typ) {
			tag := f.Tag.Get("json")
			if f.Anonymous && tag == "" && f.Type.Kind() == reflect.Struct {
				continue
			}
			name, opts, _ := strings.Cut(tag, ",")
			if name == "" || name == "-" {
				t.Errorf("%s: field %s has no json name", path, f.Name)
				continue
			}
			seen[name] = true
			prop, ok := props[name].(map[string]any)
			if !ok {
				t.Errorf("%s.%s: Go field %s.%s has no schema property", path, name, typ.Name(), f.Name)
				continue
			}
			if d, _ := prop["description"].(string); d == "" {
				t.Errorf("%s.%s: property has no description", path, name)
			}
			if omit := strings.Contains(opts, "omitempty") || strings.Contains(opts, "omitzero"); omit == required[name] {
				t.Errorf("%s.%s: required=%v but omitempty=%v", path, name, required[name], omit)
			}
			sd.compare(path+"."+name, file, prop, f.Type)
		}
		for name := range props {
			if !seen[name] {
				t.Errorf("%s.%s: schema property has no Go field in %s", path, name, typ.Name())
			}
		}
	}
}

func TestStructsMatchSchemas(t *testing.T) {
	t.Parallel()
	sd := newSchemaDoc(t)
	for typ, newMsg := range busStructs {
		root := sd.docs[string(typ)+".json"]
		if root == nil {
			t.Fatalf("no schema file for %s", typ)
		}
		if root["$schema"] != "http://json-schema.org/draft-07/schema#" {
			t.Errorf("%s: $schema is %v, want draft-07", typ, root["$schema"])
		}
		if d, _ := root["description"].(string); d == "" || strings.Contains(d, "placeholder") {
			t.Errorf("%s: schema has no description", typ)
		}
		sd.compare(string(typ), string(typ)+".json", root, reflect.TypeOf(newMsg()))
	}
}

// runtimeStructs maps runtime.* schemas to the Go structs the worker decodes the
// runtime's answers into, so a field added on one side of the pipe is added on both.
var runtimeStructs = map[Type]func() any{
	RuntimeInfoResult:        func() any { return new(RuntimeInfo) },
	RuntimeHealthResult:      func() any { return new(HealthResult) },
	RuntimeShutdownParams:    func() any { return new(ShutdownParams) },
	RuntimeShutdownResult:    func() any { return new(ShutdownResult) },
	RuntimeModelLoadParams:   func() any { return new(ModelLoadParams) },
	RuntimeModelLoadResult:   func() any { return new(ModelLoadResult) },
	RuntimeModelUnloadParams: func() any { return new(ModelUnloadParams) },
	RuntimeModelUnloadResult: func() any { return new(ModelUnloadResult) },
	RuntimeGenerateParams:    func() any { return new(GenerateParams) },
	RuntimeGenerateResult:    func() any { return new(GenerateResult) },
	RuntimeGenerateChunk:     func() any { return new(GenerateChunk) },
	RuntimeCancelParams:      func() any { return new(CancelParams) },
	RuntimeCancelResult:      func() any { return new(CancelResult) },
	RuntimeTokenizeParams:    func() any { return new(TokenizeParams) },
	RuntimeTokenizeResult:    func() any { return new(TokenizeResult) },
}

func TestRuntimeStructsMatchSchemas(t *testing.T) {
	t.Parallel()
	sd := newSchemaDoc(t)
	for typ, newMsg := range runtimeStructs {
		root := sd.docs[string(typ)+".json"]
		if root == nil {
			t.Fatalf("no schema file for %s", typ)
		}
		sd.compare(string(typ), string(typ)+".json", root, reflect.TypeOf(newMsg()))
	}
}
