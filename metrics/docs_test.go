package metrics_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/metrics"
)

// TestObservabilityDocListsEveryMetric: docs/OBSERVABILITY.md has a row for every
// metric in the catalog, with its type.
func TestObservabilityDocListsEveryMetric(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "docs", "OBSERVABILITY.md"))
	if err != nil {
		t.Fatal(err)
	}
	doc := string(raw)
	for _, s := range metrics.Catalog() {
		if !strings.Contains(doc, "| `"+s.Name+"` | "+string(s.Kind)+" |") {
			t.Errorf("docs/OBSERVABILITY.md has no row for %s (%s)", s.Name, s.Kind)
		}
	}
}
