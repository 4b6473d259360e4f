package schemas

import (
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"github.com/xeipuuv/gojsonschema"
)

// busStructs maps every bus type to a constructor of its Go struct.
var busStructs = map[Type]func() any{
	Job:             func() any { return new(JobRequest) },
	TokenEvent:      func() any { return new(TokenEventMsg) },
	Result:          func() any { return new(ResultMsg) },
	Cancel:          func() any { return new(CancelMsg) },
	Heartbeat:       func() any { return new(HeartbeatMsg) },
	Assignment:      func() any { return new(AssignmentMsg) },
	AssignmentReply: func() any { return new(AssignmentReplyMsg) },
	AttemptReport:   func() any { return new(AttemptReportMsg) },
	DLQRecord:       func() any { return new(DLQRecordMsg) },
	FinishReply:     func() any { return new(FinishReplyMsg) },
}

type vector struct {
	typ   Type
	valid bool
	name  string // file name without .json
	path  string
	doc   []byte
}

// loadVectors reads every vector under testdata, whatever types exist there.
func loadVectors(t *testing.T) []vector {
	t.Helper()
	dirs, err := os.ReadDir("testdata")
	if err != nil {
		t.Fatal(err)
	}
	var out []vector
	for _, d := range dirs {
		if !d.IsDir() {
			continue
		}
		for _, kind := range []string{"valid", "invalid"} {
			paths, err := filepath.Glob(filepath.Join("testdata", d.Name(), kind, "*.json"))
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range paths {
				doc, err := os.ReadFile(p)
				if err != nil {
					t.Fatal(err)
				}
				out = append(out, vector{typ: Type(d.Name()), valid: kind == "valid", name: strings.TrimSuffix(filepath.Base(p), ".json"), path: p, doc: doc})
			}
		}
	}
	if len(out) == 0 {
		t.Fatal("no vectors under testdata")
	}
	return out
}

func TestVectors(t *testing.T) {
	t.Parallel()
	types := Types()
	for _, v := range loadVectors(t) {
		t.Run(v.path, func(t *testing.T) {
			t.Parallel()
			if !slices.Contains(types, v.typ) {
				t.Fatalf("vector for type %q, which has no schema", v.typ)
			}
			err := Validate(v.typ, v.doc)
			if v.valid {
				if err != nil {
					t.Fatalf("valid vector rejected: %v", err)
				}
				return
			}
			var verr *ValidationError
			if !errors.As(err, &verr) {
				t.Fatalf("invalid vector: got %v, want a *ValidationError", err)
			}
			if len(verr.Violations) == 0 {
				t.Fatal("ValidationError without violations")
			}
			for _, vi := range verr.Violations {
				if !strings.HasPrefix(vi.Path, "$") || vi.Reason == "" {
					t.Errorf("malformed violation %+v", vi)
				}
			}
			if _, bus := busStructs[v.typ]; !bus {
				return
			}
			want, ok := wantPath[string(v.typ)+"/"+v.name]
			if !ok {
				t.Fatalf("bus vector %s has no entry in wantPath", v.path)
			}
			if !slices.ContainsFunc(verr.Violations, func(vi Violation) bool { return vi.Path == want }) {
				t.Fatalf("violations %+v do not include path %s", verr.Violations, want)
			}
		})
	}
}

func TestEveryTypeHasEnoughVectors(t *testing.T) {
	t.Parallel()
	count := map[Type][2]int{}
	for _, v := range loadVectors(t) {
		c := count[v.typ]
		if v.valid {
			c[0]++
		} else {
			c[1]++
		}
		count[v.typ] = c
	}
	for _, typ := range Types() {
		if c := count[typ]; c[0] < 2 || c[1] < 5 {
			t.Errorf("%s: %d valid and %d invalid vectors, want at least 2 and 5", typ, c[0], c[1])
		}
	}
	for typ := range busStructs {
		if !slices.Contains(Types(), typ) {
			t.Errorf("bus type %s has no schema", typ)
		}
	}
}

func TestWantPathNamesExistingVectors(t *testing.T) {
	t.Parallel()
	for key := range wantPath {
		typ, name, _ := strings.Cut(key, "/")
		if _, err := os.Stat(filepath.Join("testdata", typ, "invalid", name+".json")); err != nil {
			t.Errorf("wantPath entry %s: %v", key, err)
		}
	}
}

// TestValidVectorsRoundTrip keeps the Go structs and the schemas from drifting: every
// valid document decodes strictly into its struct and comes back out unchanged and valid.
func TestValidVectorsRoundTrip(t *testing.T) {
	t.Parallel()
	for _, v := range loadVectors(t) {
		newMsg, bus := busStructs[v.typ]
		if !v.valid || !bus {
			continue
		}
		t.Run(v.path, func(t *testing.T) {
			t.Parallel()
			msg := newMsg()
			dec := json.NewDecoder(bytes.NewReader(v.doc))
			dec.DisallowUnknownFields()
			if err := dec.Decode(msg); err != nil {
				t.Fatalf("decode into %T: %v", msg, err)
			}
			out, err := json.Marshal(msg)
			if err != nil {
				t.Fatal(err)
			}
			if err := Validate(v.typ, out); err != nil {
				t.Fatalf("re-encoded %T fails its schema: %v\n%s", msg, err, out)
			}
			var before, after any
			if err := json.Unmarshal(v.doc, &before); err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(out, &after); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(before, after) {
				t.Fatalf("round trip through %T changed the document:\nbefore %s\nafter  %s", msg, v.doc, out)
			}
		})
	}
}

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

var (
	timeType       = reflect.TypeFor[time.Time]()
	toolChoiceType = reflect.TypeFor[ToolChoice]()
)

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

func violationsOf(t *testing.T, typ Type, doc string) []Violation {
	t.Helper()
	err := Validate(typ, []byte(doc))
	var verr *ValidationError
	if !errors.As(err, &verr) {
		t.Fatalf("Validate(%s, %s) = %v, want a *ValidationError", typ, doc, err)
	}
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("errors.Is(%v, ErrInvalid) is false", err)
	}
	return verr.Violations
}

func paths(vs []Violation) []string {
	out := make([]string, len(vs))
	for i, v := range vs {
		out[i] = v.Path
	}
	return out
}

func TestViolationPaths(t *testing.T) {
	t.Parallel()
	const base = `"id":"01JZ8Q4T6W3N5V7X9Y1A2B3C4D","reply_to":"_INBOX.a"`
	cases := []struct {
		name string
		typ  Type
		doc  string
		want []string
	}{
		{"temperature out of range", Job, `{` + base + `,"model":"m","prompt":"p","temperature":5}`, []string{"$.temperature"}},
		{"bad role of the second message", Job, `{` + base + `,"model":"m","messages":[{"role":"user","content":"a"},{"role":"robot","content":"b"}]}`, []string{"$.messages[1].role"}},
		{"missing model", Job, `{` + base + `,"prompt":"p"}`, []string{"$.model"}},
		{"three problems, three violations", Job, `{` + base + `,"messages":[{"role":"user","content":"a"},{"role":"robot","content":"b"}],"temperature":5}`,
			[]string{"$.messages[1].role", "$.model", "$.temperature"}},
		{"unknown nested field", Job, `{` + base + `,"model":"m","messages":[{"role":"user","content":"a","name":"x"}]}`, []string{"$.messages[0].name"}},
		{"unknown top-level field", Job, `{` + base + `,"model":"m","prompt":"p","stream":true}`, []string{"$.stream"}},
		{"both prompt and messages", Job, `{` + base + `,"model":"m","prompt":"p","messages":[{"role":"user","content":"a"}]}`, []string{"$"}},
		{"bad metadata key is one violation", Job, `{` + base + `,"model":"m","prompt":"p","metadata":{"a.b":"x"}}`, []string{"$.metadata"}},
		{"failed result without error is one violation", Result, `{"type":"result","job_id":"j","attempt":1,"seq":0,"status":"failed","text":"","usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0},"finished_at":"2025-06-01T12:00:00Z"}`, []string{"$.error"}},
		{"nested job in an assignment", Assignment, `{"batch_id":"b","dispatcher_id":"d","model":"m","jobs":[{"attempt":1,"job":{` + base + `,"model":"m","prompt":"p","top_p":0}}]}`, []string{"$.jobs[0].job.top_p"}},
		{"document is not an object", TokenEvent, `"token"`, []string{"$"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			got := paths(violationsOf(t, c.typ, c.doc))
			want := slices.Clone(c.want)
			sort.Strings(want)
			if !slices.Equal(got, want) {
				t.Fatalf("paths %v, want %v", got, want)
			}
		})
	}
}

func TestNotJSON(t *testing.T) {
	t.Parallel()
	for _, doc := range []string{"", "not json", `{"id":`, "\x00\x01", `{"id":"a"} trailing`} {
		t.Run(doc, func(t *testing.T) {
			t.Parallel()
			vs := violationsOf(t, Job, doc)
			if len(vs) != 1 || vs[0].Path != "$" || !strings.Contains(vs[0].Reason, "not valid JSON") {
				t.Fatalf("violations %+v, want one at $ saying not valid JSON", vs)
			}
		})
	}
}

func TestUnknownType(t *testing.T) {
	t.Parallel()
	for _, typ := range []Type{"nope", "", "job.json", "../schemas"} {
		if err := Validate(typ, []byte(`{}`)); !errors.Is(err, ErrUnknownType) || errors.Is(err, ErrInvalid) {
			t.Errorf("Validate(%q) = %v, want ErrUnknownType only", typ, err)
		}
		if b, err := Raw(typ); !errors.Is(err, ErrUnknownType) || b != nil {
			t.Errorf("Raw(%q) = %d bytes, %v; want ErrUnknownType", typ, len(b), err)
		}
	}
}

func TestCode(t *testing.T) {
	t.Parallel()
	want := map[Type]string{
		Job: "invalid_request", Cancel: "invalid_request",
		TokenEvent: "invalid_message", Result: "invalid_message", Heartbeat: "invalid_message",
		Assignment: "invalid_message", AssignmentReply: "invalid_message",
		AttemptReport: "invalid_message", DLQRecord: "invalid_message", FinishReply: "invalid_message",
		"runtime.generate": "invalid_params",
	}
	for typ, code := range want {
		if got := Code(typ); got != code {
			t.Errorf("Code(%s) = %q, want %q", typ, got, code)
		}
	}
	// The code travels in the error, with the type.
	err := Validate(Cancel, []byte(`{}`))
	var verr *ValidationError
	if !errors.As(err, &verr) || verr.Code != "invalid_request" || verr.Type != Cancel {
		t.Fatalf("Validate(cancel, {}) = %#v", err)
	}
	msg := err.Error()
	for _, part := range []string{"invalid_request", "cancel", "$.job_id", "$.requested_at", ";"} {
		if !strings.Contains(msg, part) {
			t.Errorf("Error() = %q, missing %q", msg, part)
		}
	}
	// The error marshals for a reply to the producer.
	b, err := json.Marshal(verr)
	if err != nil || !strings.Contains(string(b), `"path":"$.job_id"`) {
		t.Fatalf("marshal: %s, %v", b, err)
	}
}

func TestTypesAndRaw(t *testing.T) {
	t.Parallel()
	types := Types()
	if !slices.IsSorted(types) {
		t.Errorf("Types() not sorted: %v", types)
	}
	for typ := range busStructs {
		if !slices.Contains(types, typ) {
			t.Errorf("Types() lacks %s", typ)
		}
	}
	for _, typ := range types {
		raw, err := Raw(typ)
		if err != nil {
			t.Fatalf("Raw(%s): %v", typ, err)
		}
		var head struct {
			Title string `json:"title"`
		}
		if err := json.Unmarshal(raw, &head); err != nil {
			t.Fatalf("Raw(%s): %v", typ, err)
		}
		if _, bus := busStructs[typ]; bus && head.Title != string(typ) {
			t.Errorf("%s.json has title %q", typ, head.Title)
		}
	}
}

// TestCompileEachFile compiles every file on its own, checked against the draft-07
// meta-schema, and shows that broken schemas are refused rather than half-loaded.
func TestCompileEachFile(t *testing.T) {
	t.Parallel()
	raws, err := readAll(files)
	if err != nil {
		t.Fatal(err)
	}
	for name := range raws {
		if _, err := compileOne(name, raws); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	if len(raws) != len(Types()) {
		t.Errorf("%d files but %d types", len(raws), len(Types()))
	}

	broken := map[string]map[string][]byte{
		"meta-schema violation": {"x.json": []byte(`{"$schema":"http://json-schema.org/draft-07/schema#","type":5}`)},
		"not JSON":              {"x.json": []byte(`{`)},
		"dangling $ref": {
			"x.json":   []byte(`{"$schema":"http://json-schema.org/draft-07/schema#","$id":"https://mlx-serving.dev/schemas/x.json","properties":{"a":{"$ref":"job.json#/definitions/nope"}}}`),
			"job.json": raws["job.json"],
		},
		"$ref to a file that is not embedded": {
			"x.json": []byte(`{"$schema":"http://json-schema.org/draft-07/schema#","$id":"https://mlx-serving.dev/schemas/x.json","properties":{"a":{"$ref":"nowhere.json"}}}`),
		},
		"duplicate $id": {
			"x.json": []byte(`{"$schema":"http://json-schema.org/draft-07/schema#"}`),
			"a.json": []byte(`{"$id":"https://mlx-serving.dev/schemas/same.json"}`),
			"b.json": []byte(`{"$id":"https://mlx-serving.dev/schemas/same.json"}`),
		},
	}
	wantErr := map[string]string{
		"meta-schema violation":               "not a draft-07 schema",
		"$ref to a file that is not embedded": "not an embedded schema", // refused, not fetched
	}
	for name, files := range broken {
		if _, err := compileOne("x.json", files); err == nil || !strings.Contains(err.Error(), wantErr[name]) {
			t.Errorf("%s: compileOne = %v, want an error with %q", name, err, wantErr[name])
		}
		if _, err := compileAll(files); err == nil {
			t.Errorf("%s: compileAll succeeded", name)
		}
	}
}

func TestCompileFS(t *testing.T) {
	t.Parallel()
	// compileFS(files) itself runs in every test through compile().
	// A directory named like a schema cannot be read as one.
	bad := fstest.MapFS{"dir.json/x": {Data: []byte(`{}`)}}
	if _, err := compileFS(bad); err == nil || !strings.Contains(err.Error(), "dir.json") {
		t.Fatalf("compileFS(dir.json/) = %v, want a read error naming it", err)
	}
	if _, err := compileFS(fstest.MapFS{"x.json": {Data: []byte(`{"type":"nope"}`)}}); err == nil {
		t.Fatal("compileFS accepted a schema with an unknown type")
	}
}

// The loader only ever serves an already decoded document; its other methods exist
// for gojsonschema's interface and must describe that document.
func TestDecodedLoader(t *testing.T) {
	t.Parallel()
	l := decoded{map[string]any{"a": json.Number("1")}}
	if got, err := l.LoadJSON(); err != nil || !reflect.DeepEqual(got, l.JsonSource()) {
		t.Fatalf("LoadJSON() = %v, %v", got, err)
	}
	// The same reference gojsonschema's own document loaders give.
	want, _ := gojsonschema.NewBytesLoader(nil).JsonReference()
	if ref, err := l.JsonReference(); err != nil || ref.String() != want.String() {
		t.Fatalf("JsonReference() = %q, %v; want %q", ref.String(), err, want.String())
	}
	// Nothing outside the embedded files is ever fetched.
	m := l.LoaderFactory().New("https://example.com/x.json")
	if _, err := m.LoadJSON(); err == nil || !strings.Contains(err.Error(), "not an embedded schema") {
		t.Fatalf("LoadJSON of a foreign $ref = %v", err)
	}
	if ref, err := m.JsonReference(); err != nil || ref.String() != "https://example.com/x.json" || m.JsonSource() != "https://example.com/x.json" {
		t.Fatalf("missing loader describes %v / %v, %v", m.JsonSource(), ref.String(), err)
	}
	if _, ok := m.LoaderFactory().(offline); !ok {
		t.Fatal("a missing loader hands out an online factory")
	}
}

func TestCompilesOnce(t *testing.T) {
	t.Parallel()
	for _, typ := range Types() {
		a, err := schemaFor(typ)
		if err != nil {
			t.Fatal(err)
		}
		if b, _ := schemaFor(typ); a != b {
			t.Fatalf("%s compiled twice", typ)
		}
	}
	if _, err := schemaFor("nope"); !errors.Is(err, ErrUnknownType) {
		t.Fatalf("schemaFor(nope) = %v", err)
	}
}

// A process compiles only the types it validates: a compiled schema keeps its
// whole $ref pool, and all of them up front cost every process ~10 MB.
func TestCompilesLazily(t *testing.T) {
	t.Parallel()
	raws, err := readAll(files)
	if err != nil {
		t.Fatal(err)
	}
	r := newLazyRegistry(raws)
	if n := r.compiled(); n != 0 {
		t.Fatalf("%d compiled before any use", n)
	}
	for range 2 {
		if _, err := r.schema(Result); err != nil {
			t.Fatal(err)
		}
	}
	if n := r.compiled(); n != 1 {
		t.Fatalf("%d compiled after asking for result, want 1", n)
	}
	if _, err := r.schema(Job); err != nil {
		t.Fatal(err)
	}
	if n := r.compiled(); n != 2 {
		t.Fatalf("%d compiled after asking for job too, want 2", n)
	}
}

// A schema's pool holds the files it refers to, directly or through them, and
// no others.
func TestRefClosure(t *testing.T) {
	t.Parallel()
	raws, err := readAll(files)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string][]string{
		"job.json":         {},
		"result.json":      {"job.json", "token_event.json"},
		"dlq_record.json":  {"job.json", "result.json", "token_event.json"},
		"token_event.json": {"job.json"},
	} {
		doc, err := decode(raws[name])
		if err != nil {
			t.Fatal(err)
		}
		got, err := refClosure(name, doc, raws)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("refClosure(%s) = %v, %v; want %v", name, got, err, want)
		}
	}
}

func TestConcurrentValidate(t *testing.T) {
	t.Parallel()
	good, err := os.ReadFile("testdata/job/valid/chat_every_field.json")
	if err != nil {
		t.Fatal(err)
	}
	bad := []byte(`{"id":"x","model":"m","prompt":"p","reply_to":"r","temperature":5}`)
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for range 32 {
		wg.Go(func() {
			for range 20 {
				if err := Validate(Job, good); err != nil {
					errs <- err
					return
				}
				var verr *ValidationError
				if err := Validate(Job, bad); !errors.As(err, &verr) || len(verr.Violations) != 1 || verr.Violations[0].Path != "$.temperature" {
					errs <- errors.Join(errors.New("bad doc"), err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
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

// compileFS compiles every *.json file at the top of fsys.
func compileFS(fsys fs.FS) (map[Type]*gojsonschema.Schema, error) {
	raws, err := readAll(fsys)
	if err != nil {
		return nil, err
	}
	return compileAll(raws)
}

// compileAll compiles every file of raws (name -> content) by its type name.
func compileAll(raws map[string][]byte) (map[Type]*gojsonschema.Schema, error) {
	out := make(map[Type]*gojsonschema.Schema, len(raws))
	for name := range raws {
		s, err := compileOne(name, raws)
		if err != nil {
			return nil, err
		}
		out[Type(strings.TrimSuffix(name, ".json"))] = s
	}
	return out, nil
}
