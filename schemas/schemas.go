// Package schemas owns the JSON Schemas (draft-07) of every message that crosses a
// process boundary — on the bus and on the runtime pipe — and validates documents
// against them. The schema files are the single source of truth: Go and the Python
// runtime read the same files, and schemas/testdata holds vectors both sides run.
package schemas

import (
	"bytes"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"path"
	"sort"
	"strings"
	"sync"

	"github.com/xeipuuv/gojsonreference"
	"github.com/xeipuuv/gojsonschema"
)

//go:embed *.json
var files embed.FS

// Type names a message type; it is the schema file name without ".json".
type Type string

// ErrInvalid is matched by every *ValidationError, so callers can test with errors.Is.
var ErrInvalid = errors.New("schemas: invalid document")

// ErrUnknownType is returned for a Type that has no schema file.
var ErrUnknownType = errors.New("schemas: unknown message type")

// Violation is one way a document breaks its schema.
type Violation struct {
	// Path is the JSON path of the offending value, "$" for the document itself.
	Path string `json:"path"`
	// Reason says what is wrong, in words.
	Reason string `json:"reason"`
}

// ValidationError reports every violation of one document, with a stable code.
type ValidationError struct {
	Code       string      `json:"code"`
	Type       Type        `json:"type"`
	Violations []Violation `json:"violations"`
}

func (e *ValidationError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %s:", e.Code, e.Type)
	for i, v := range e.Violations {
		if i > 0 {
			b.WriteString(";")
		}
		fmt.Fprintf(&b, " %s: %s", v.Path, v.Reason)
	}
	return b.String()
}

// Is makes errors.Is(err, ErrInvalid) true for every validation error.
func (e *ValidationError) Is(target error) bool { return target == ErrInvalid }

// Code returns the stable error code for a document of type t that fails its schema:
// "invalid_request" for what producers send, "invalid_message" for everything else.
func Code(t Type) string {
	switch t {
	case Job, Cancel:
		return CodeInvalidRequest
	}
	if strings.HasPrefix(string(t), "runtime.") {
		return CodeInvalidParams
	}
	return CodeInvalidMessage
}

// The embedded files are read once; each type's schema is compiled the first
// time a document of that type is validated, and then kept. A process compiles
// only what it validates: the worker needs job and result, not the 30 files,
// and a compiled schema holds its whole $ref pool in memory (all 30 compiled up
// front were ~10 MB of live heap in every process, a third of the worker's
// RSS budget).
var registry = sync.OnceValues(func() (*lazyRegistry, error) {
	raws, err := readAll(files)
	if err != nil {
		return nil, err
	}
	return newLazyRegistry(raws), nil
})

// lazyRegistry holds schema files and compiles each the first time it is asked
// for, exactly once.
type lazyRegistry struct {
	raws  map[string][]byte
	types map[Type]*lazySchema
}

// lazySchema is one type's schema, compiled on first use.
type lazySchema struct {
	once sync.Once
	done bool // set inside once: for compiled()
	s    *gojsonschema.Schema
	err  error
}

func newLazyRegistry(raws map[string][]byte) *lazyRegistry {
	r := &lazyRegistry{raws: raws, types: make(map[Type]*lazySchema, len(raws))}
	for name := range raws {
		r.types[Type(strings.TrimSuffix(name, ".json"))] = &lazySchema{}
	}
	return r
}

// schema returns the compiled schema of t; ErrUnknownType when t has no file.
func (r *lazyRegistry) schema(t Type) (*gojsonschema.Schema, error) {
	l, ok := r.types[t]
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrUnknownType, t)
	}
	l.once.Do(func() {
		l.s, l.err = compileOne(string(t)+".json", r.raws)
		l.done = true
	})
	return l.s, l.err
}

// compiled counts the types compiled so far (tests; not safe against a
// concurrent first compile).
func (r *lazyRegistry) compiled() int {
	n := 0
	for _, l := range r.types {
		if l.done {
			n++
		}
	}
	return n
}

// schemaFor returns the embedded schema of t, compiled exactly once per process.
func schemaFor(t Type) (*gojsonschema.Schema, error) {
	r, err := registry()
	if err != nil {
		return nil, err
	}
	return r.schema(t)
}

// readAll returns every schema file of fsys by name.
func readAll(fsys fs.FS) (map[string][]byte, error) {
	names, err := fs.Glob(fsys, "*.json")
	if err != nil {
		return nil, err
	}
	raws := make(map[string][]byte, len(names))
	for _, n := range names {
		if raws[n], err = fs.ReadFile(fsys, n); err != nil {
			return nil, fmt.Errorf("schemas: read %s: %w", n, err)
		}
	}
	return raws, nil
}

// compileOne compiles the file name. Schemas refer to each other by relative $ref
// ("job.json#/definitions/id"), resolved against their $id, so the other files it
// refers to, directly or through them (refClosure), are put in the loader's pool
// first, and a $ref to anything else fails instead of being fetched over the
// network. The compiled schema keeps its pool: only what it refers to is in it.
// Each file is also checked against the draft-07 meta-schema.
func compileOne(name string, raws map[string][]byte) (*gojsonschema.Schema, error) {
	doc, err := decode(raws[name])
	if err != nil {
		return nil, fmt.Errorf("schemas: compile %s: %w", name, err)
	}
	if err := metaCheck(doc); err != nil {
		return nil, fmt.Errorf("schemas: compile %s: %w", name, err)
	}
	// The loader's own meta-schema check (SchemaLoader.Validate) is left off: it swaps
	// the pool's loader factory for the default one, which would fetch unknown $refs.
	sl := gojsonschema.NewSchemaLoader()
	sl.Draft = gojsonschema.Draft7
	others, err := refClosure(name, doc, raws)
	if err != nil {
		return nil, fmt.Errorf("schemas: compile %s: %w", name, err)
	}
	for _, other := range others {
		if err := sl.AddSchemas(gojsonschema.NewBytesLoader(raws[other])); err != nil {
			return nil, fmt.Errorf("schemas: compile %s: load %s: %w", name, other, err)
		}
	}
	s, err := sl.Compile(decoded{doc})
	if err != nil {
		return nil, fmt.Errorf("schemas: compile %s: %w", name, err)
	}
	return s, nil
}

// draft07 is the draft-07 meta-schema; gojsonschema serves it from memory.
var draft07 = sync.OnceValues(func() (*gojsonschema.Schema, error) {
	return gojsonschema.NewSchema(gojsonschema.NewReferenceLoader("http://json-schema.org/draft-07/schema#"))
})

// metaCheck reports every way the schema doc breaks the draft-07 meta-schema.
func metaCheck(doc any) error {
	meta, err := draft07()
	if err != nil {
		return err
	}
	res, err := meta.Validate(decoded{doc})
	if err != nil {
		return err
	}
	if res.Valid() {
		return nil
	}
	msgs := make([]string, 0, len(res.Errors()))
	for _, re := range res.Errors() {
		msgs = append(msgs, re.String())
	}
	return fmt.Errorf("not a draft-07 schema: %s", strings.Join(msgs, "; "))
}

func schemaID(raw []byte) string {
	var head struct {
		ID string `json:"$id"`
	}
	if json.Unmarshal(raw, &head) != nil {
		return ""
	}
	return head.ID
}

// refClosure names the other files of raws that the schema name (decoded as doc)
// refers to, directly or through each other, sorted. A $ref is resolved against
// the $id of the file it is in and matched to a file by its $id, or else by its
// file name; a $ref that matches no file is left for the compiler to refuse. Two
// files declaring one $id are an error, as they were when every file went into
// every pool.
func refClosure(name string, doc any, raws map[string][]byte) ([]string, error) {
	byID := make(map[string]string, len(raws))
	ids := make(map[string]string, len(raws))
	for n, raw := range raws {
		id := schemaID(raw)
		if id == "" {
			continue
		}
		if prev, dup := byID[id]; dup {
			return nil, fmt.Errorf("%s and %s both declare $id %s", min(prev, n), max(prev, n), id)
		}
		byID[id], ids[n] = n, id
	}
	seen := map[string]bool{name: true}
	queue := []string{name}
	docs := map[string]any{name: doc}
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		d, ok := docs[cur]
		if !ok {
			var err error
			if d, err = decode(raws[cur]); err != nil {
				return nil, fmt.Errorf("load %s: %w", cur, err)
			}
		}
		base, _ := url.Parse(ids[cur])
		for _, ref := range refs(d, nil) {
			u, err := url.Parse(ref)
			if err != nil {
				continue // the compiler reports it
			}
			if base != nil {
				u = base.ResolveReference(u)
			}
			u.Fragment = ""
			target, ok := byID[u.String()]
			if !ok {
				if _, file := raws[path.Base(u.Path)]; file && u.Path != "" {
					target, ok = path.Base(u.Path), true
				}
			}
			if ok && !seen[target] {
				seen[target] = true
				queue = append(queue, target)
			}
		}
	}
	out := make([]string, 0, len(seen)-1)
	for n := range seen {
		if n != name {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out, nil
}

// refs appends every "$ref" string in the decoded document v to out.
func refs(v any, out []string) []string {
	switch v := v.(type) {
	case map[string]any:
		for k, x := range v {
			if s, ok := x.(string); ok && k == "$ref" {
				out = append(out, s)
				continue
			}
			out = refs(x, out)
		}
	case []any:
		for _, x := range v {
			out = refs(x, out)
		}
	}
	return out
}

// Types lists every message type that has a schema, sorted.
func Types() []Type {
	r, err := registry()
	if err != nil {
		panic(err) // the embedded files are part of the binary; tests catch a bad one
	}
	out := make([]Type, 0, len(r.types))
	for t := range r.types {
		out = append(out, t)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// Raw returns the schema file of type t.
func Raw(t Type) ([]byte, error) {
	b, err := files.ReadFile(string(t) + ".json")
	if err != nil {
		return nil, fmt.Errorf("%w: %q", ErrUnknownType, t)
	}
	return b, nil
}

// Validate checks doc against the schema of type t. It returns nil, a
// *ValidationError listing every violation, or ErrUnknownType.
func Validate(t Type, doc []byte) error {
	s, err := schemaFor(t)
	if err != nil {
		return err
	}
	v, err := decode(doc)
	if err != nil {
		// Not JSON at all: the document itself is the violation.
		return &ValidationError{Code: Code(t), Type: t, Violations: []Violation{{Path: "$", Reason: "not valid JSON: " + err.Error()}}}
	}
	res, err := s.Validate(decoded{v})
	if err != nil {
		return err // decoded.LoadJSON cannot fail; kept for gojsonschema's signature
	}
	var deep []Violation
	if t == Job || t == RuntimeGenerateParams {
		deep = schemaViolations(v) // what JSON Schema cannot say: see MaxSchemaDepth
	}
	if res.Valid() && deep == nil {
		return nil
	}
	vs := violations(res.Errors())
	if deep != nil {
		vs = append(vs, deep...)
		sort.SliceStable(vs, func(i, j int) bool { return vs[i].Path < vs[j].Path })
	}
	return &ValidationError{Code: Code(t), Type: t, Violations: vs}
}

// decode parses doc as gojsonschema expects (numbers as json.Number, so integers stay
// exact) and, unlike gojsonschema's bytes loader, refuses anything after the first
// value: `{...} garbage` or two concatenated documents would pass that loader but
// fail every consumer's json.Unmarshal.
func decode(doc []byte) (any, error) {
	dec := json.NewDecoder(bytes.NewReader(doc))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("data after the JSON value")
	}
	return v, nil
}

// decoded hands gojsonschema a document (or schema) decode already parsed.
type decoded struct{ v any }

func (d decoded) JsonSource() any                               { return d.v }
func (d decoded) LoadJSON() (any, error)                        { return d.v, nil }
func (d decoded) LoaderFactory() gojsonschema.JSONLoaderFactory { return offline{} }
func (d decoded) JsonReference() (gojsonreference.JsonReference, error) {
	return gojsonreference.NewJsonReference("#")
}

// offline is the loader factory of compiled schemas: gojsonschema asks it for any
// $ref not in the pool, and the default factory would fetch it over HTTP.
type offline struct{}

func (offline) New(source string) gojsonschema.JSONLoader { return missing(source) }

// missing is a $ref target that is not an embedded schema.
type missing string

func (m missing) JsonSource() any                               { return string(m) }
func (m missing) LoaderFactory() gojsonschema.JSONLoaderFactory { return offline{} }
func (m missing) JsonReference() (gojsonreference.JsonReference, error) {
	return gojsonreference.NewJsonReference(string(m))
}
func (m missing) LoadJSON() (any, error) {
	return nil, fmt.Errorf("$ref to %s, which is not an embedded schema", string(m))
}

// wrappers are errors that only say a nested schema failed (allOf, if/then/else);
// gojsonschema lists the nested errors as well, so the wrappers would count one
// problem twice.
var wrappers = map[string]bool{"number_all_of": true, "condition_then": true, "condition_else": true}

// violations turns gojsonschema's errors into one Violation per problem.
func violations(errs []gojsonschema.ResultError) []Violation {
	out := make([]Violation, 0, len(errs))
	nameAt := "" // context of the last bad property name; the reasons it fails follow it
	for _, re := range errs {
		typ := re.Type()
		if wrappers[typ] {
			continue
		}
		if nameAt != "" && re.Field() == nameAt && typ != "invalid_property_name" {
			out[len(out)-1].Reason += ": " + re.Description()
			continue
		}
		nameAt = ""
		if typ == "invalid_property_name" {
			nameAt = re.Field()
		}
		out = append(out, Violation{Path: jsonPath(re), Reason: re.Description()})
	}
	// gojsonschema walks properties in map order, which differs between processes;
	// sorted, the same document always yields the same error text.
	sort.SliceStable(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out
}

// jsonPath turns gojsonschema's "(root)" / "a.b.0" context into "$" / "$.a.b[0]".
// A missing required property and an unknown one are reported at the property they
// name, since that is where the caller has to look.
func jsonPath(re gojsonschema.ResultError) string {
	ctx := re.Field()
	switch re.Type() {
	case "required", "additional_property_not_allowed":
		if p, ok := re.Details()["property"].(string); ok {
			if ctx == "(root)" {
				ctx = p
			} else {
				ctx = ctx + "." + p
			}
		}
	}
	if ctx == "(root)" || ctx == "" {
		return "$"
	}
	var b strings.Builder
	b.WriteString("$")
	for _, part := range strings.Split(ctx, ".") {
		if part != "" && strings.Trim(part, "0123456789") == "" {
			fmt.Fprintf(&b, "[%s]", part)
		} else {
			b.WriteString("." + part)
		}
	}
	return b.String()
}
