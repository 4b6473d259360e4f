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

var (
	compileOnce sync.Once
	compiled    map[Type]*gojsonschema.Schema
	compileErr  error
)

// compile loads and compiles every embedded schema exactly once per process.
func compile() (map[Type]*gojsonschema.Schema, error) {
	compileOnce.Do(func() { compiled, compileErr = compileFS(files) })
	return compiled, compileErr
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
// ("job.json#/definitions/id"), resolved against their $id, so every other file that
// declares an $id is put in the loader's pool first, and a $ref to anything else
// fails instead of being fetched over the network.
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
	for other, raw := range raws {
		if other == name || !hasID(raw) {
			continue
		}
		if err := sl.AddSchemas(gojsonschema.NewBytesLoader(raw)); err != nil {
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

func hasID(raw []byte) bool {
	var head struct {
		ID string `json:"$id"`
	}
	return json.Unmarshal(raw, &head) == nil && head.ID != ""
}

// Types lists every message type that has a schema, sorted.
func Types() []Type {
	m, err := compile()
	if err != nil {
		panic(err) // the embedded files are part of the binary; tests catch a bad one
	}
	out := make([]Type, 0, len(m))
	for t := range m {
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
	m, err := compile()
	if err != nil {
		return err
	}
	s, ok := m[t]
	if !ok {
		return fmt.Errorf("%w: %q", ErrUnknownType, t)
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
	if res.Valid() {
		return nil
	}
	return &ValidationError{Code: Code(t), Type: t, Violations: violations(res.Errors())}
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
