package schemas

import (
	"encoding/json"
	"slices"
	"testing"
)

// TestPrioritiesAgree: NumPriorities, Priorities and job.json's enum name the same
// levels in the same order (the order is the dispatcher's queue index).
func TestPrioritiesAgree(t *testing.T) {
	t.Parallel()
	if len(Priorities) != NumPriorities {
		t.Fatalf("len(Priorities) = %d, NumPriorities = %d", len(Priorities), NumPriorities)
	}
	raw, err := files.ReadFile("job.json")
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Properties struct {
			Priority struct {
				Enum []string `json:"enum"`
			} `json:"priority"`
		} `json:"properties"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(doc.Properties.Priority.Enum, Priorities) {
		t.Fatalf("job.json priority enum %v, Priorities %v", doc.Properties.Priority.Enum, Priorities)
	}
}

// The default max_tokens comes from the one schema both sides read.
func TestDefaultMaxTokensFromSchema(t *testing.T) {
	if DefaultMaxTokens != 4096 {
		t.Fatalf("DefaultMaxTokens = %d, want runtime.generate.params.json's default 4096", DefaultMaxTokens)
	}
}
