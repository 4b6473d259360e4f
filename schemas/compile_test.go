package schemas

import (
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/fstest"

	"github.com/xeipuuv/gojsonschema"
)

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
