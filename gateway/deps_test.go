package gateway

import (
	"go/parser"
	"go/token"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestGatewayImportsNoTransportOrMetrics keeps package gateway on its
// interfaces: Jobs and Fleet for the bus (gatewaybus provides them), Observer
// for metrics (metrics.Gateway). Mutation caught: server.go importing
// github.com/nats-io/nats.go again.
func TestGatewayImportsNoTransportOrMetrics(t *testing.T) {
	t.Parallel()
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	forbidden := []string{"github.com/nats-io/", "github.com/prometheus/", "github.com/mlx-serving/mlx-serving/metrics"}
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(token.NewFileSet(), name, nil, parser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		for _, imp := range f.Imports {
			path, _ := strconv.Unquote(imp.Path.Value)
			for _, p := range forbidden {
				if strings.HasPrefix(path, p) {
					t.Errorf("%s imports %s", name, path)
				}
			}
		}
	}
}
