package schemas

import (
	"encoding/json"
	"testing"
)

// TestMaxAttemptMatchesSchemas: every attempt number a bus schema bounds has
// MaxAttempt as its maximum, and the schemas that carry one still do (a
// renamed field would otherwise leave the constant checked against nothing).
// Mutation caught: MaxAttempt = 99, or one schema's maximum changed alone.
func TestMaxAttemptMatchesSchemas(t *testing.T) {
	t.Parallel()
	want := map[Type]bool{Assignment: false, Result: false, TokenEvent: false, AttemptReport: false, DLQRecord: false}
	for _, typ := range Types() {
		raw, err := Raw(typ)
		if err != nil {
			t.Fatal(err)
		}
		var doc any
		if err := json.Unmarshal(raw, &doc); err != nil {
			t.Fatal(err)
		}
		walkProperties(doc, func(name string, prop map[string]any) {
			if name != "attempt" && name != "attempts" {
				return
			}
			max, ok := prop["maximum"].(float64)
			if !ok {
				t.Errorf("%s: %s has no numeric maximum", typ, name)
				return
			}
			if int(max) != MaxAttempt {
				t.Errorf("%s: %s maximum %v, MaxAttempt %d", typ, name, max, MaxAttempt)
			}
			if _, listed := want[typ]; listed {
				want[typ] = true
			}
		})
	}
	for typ, seen := range want {
		if !seen {
			t.Errorf("%s has no bounded attempt field", typ)
		}
	}
}

// walkProperties calls f for every entry of every "properties" object in v.
func walkProperties(v any, f func(name string, prop map[string]any)) {
	switch v := v.(type) {
	case map[string]any:
		if props, ok := v["properties"].(map[string]any); ok {
			for name, p := range props {
				if pm, ok := p.(map[string]any); ok {
					f(name, pm)
				}
			}
		}
		for _, x := range v {
			walkProperties(x, f)
		}
	case []any:
		for _, x := range v {
			walkProperties(x, f)
		}
	}
}

// The error message bound Go code clips to is the result schema's.
func TestMaxErrorMessageMatchesSchema(t *testing.T) {
	t.Parallel()
	raw, err := Raw(Result)
	if err != nil {
		t.Fatal(err)
	}
	var doc any
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	found := false
	walkProperties(doc, func(name string, prop map[string]any) {
		if name != "message" {
			return
		}
		found = true
		if max, _ := prop["maxLength"].(float64); int(max) != MaxErrorMessage {
			t.Errorf("result error message maxLength %v, MaxErrorMessage %d", prop["maxLength"], MaxErrorMessage)
		}
	})
	if !found {
		t.Error("result.json has no error message property")
	}
	if got := ClipUTF8("aé", 2); got != "a" {
		t.Errorf("ClipUTF8 split a rune: %q", got)
	}
}
