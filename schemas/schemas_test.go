package schemas

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
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
