package schemas

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Fuzz targets for the documents that enter the system from outside: jobs (from
// producers) and token events (from workers, read by every caller). The seed
// corpus is the shared vectors of schemas/testdata, so `go test` runs them as
// ordinary tests; `go test -fuzz FuzzJob ./schemas` searches further (add
// -fuzzminimizetime 1000x as `task fuzz` does, or both workers of a 2-core machine
// can spend the whole run shrinking two inputs; see the fuzz task).
//
// Property: no panic; a document either passes its schema and then decodes into
// its Go type and survives a round trip (encode again → still valid), or fails
// with a *ValidationError carrying the type's stable code and at least one
// violation with a JSON path and a reason.

// fuzzMaxInput bounds the inputs the fuzzer makes. The vectors at and over the size
// limits (64 KiB deltas, 256 KiB prompts, 257 messages) take 2 to 10 ms a run
// against ~0.1 ms for the rest, so shrinking a mutant of one (see the fuzz task:
// 1000 runs) held a worker for 2 to 10 s. Those vectors stay seeds and are checked
// whole, by `go test` and in the fuzzer's baseline; any other input is checked on
// its first fuzzMaxInput bytes. Cut, not skipped: a skip would be a branch no seed
// takes, new coverage that only the input's length keeps.
const fuzzMaxInput = 4 << 10

// addVectors adds every valid and invalid vector of t to the corpus and returns
// the seeds over fuzzMaxInput, which bounded leaves whole.
func addVectors(f *testing.F, t Type) (large map[string]bool) {
	f.Helper()
	large = map[string]bool{}
	for _, kind := range []string{"valid", "invalid"} {
		paths, err := filepath.Glob(filepath.Join("testdata", string(t), kind, "*.json"))
		if err != nil {
			f.Fatal(err)
		}
		if len(paths) == 0 {
			f.Fatalf("no %s vectors for %s", kind, t)
		}
		for _, p := range paths {
			raw, err := os.ReadFile(p)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(raw)
			if len(raw) > fuzzMaxInput {
				large[string(raw)] = true
			}
		}
	}
	// Shapes the vectors do not cover: not JSON, trailing data, deep nesting.
	for _, s := range []string{"", "{", "null", "[]", `{"a":1} {}`, `"x"`, strings.Repeat("[", 2000), "\xff\xfe"} {
		f.Add([]byte(s))
	}
	return large
}

// bounded returns doc, cut to fuzzMaxInput bytes unless it is one of the large seeds.
func bounded(doc []byte, large map[string]bool) []byte {
	if !large[string(doc)] {
		doc = doc[:min(len(doc), fuzzMaxInput)]
	}
	return doc
}

// checkDoc asserts the property for one document of type t decoded into out.
func checkDoc[T any](t *testing.T, typ Type, doc []byte) {
	t.Helper()
	err := Validate(typ, doc)
	if err != nil {
		var verr *ValidationError
		if !errors.As(err, &verr) {
			t.Fatalf("error is not a *ValidationError: %T %v", err, err)
		}
		if !errors.Is(err, ErrInvalid) || verr.Code != Code(typ) || verr.Type != typ {
			t.Fatalf("validation error with code %q type %q: %v", verr.Code, verr.Type, err)
		}
		if len(verr.Violations) == 0 {
			t.Fatalf("validation error without violations: %v", err)
		}
		for _, v := range verr.Violations {
			if !strings.HasPrefix(v.Path, "$") || v.Reason == "" {
				t.Fatalf("violation without path or reason: %+v", v)
			}
		}
		return
	}
	var v T
	if err := json.Unmarshal(doc, &v); err != nil {
		t.Fatalf("schema-valid document does not decode into %T: %v\n%s", v, err, doc)
	}
	again, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("re-encoding %T: %v", v, err)
	}
	if err := Validate(typ, again); err != nil {
		t.Fatalf("valid document is invalid after a round trip through %T: %v\nin:  %s\nout: %s", v, err, doc, again)
	}
}

func FuzzJob(f *testing.F) {
	large := addVectors(f, Job)
	f.Fuzz(func(t *testing.T, doc []byte) { checkDoc[JobRequest](t, Job, bounded(doc, large)) })
}

func FuzzTokenEvent(f *testing.F) {
	large := addVectors(f, TokenEvent)
	f.Fuzz(func(t *testing.T, doc []byte) { checkDoc[TokenEventMsg](t, TokenEvent, bounded(doc, large)) })
}
