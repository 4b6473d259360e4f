package config

import (
	"os"
	"strings"
	"testing"
)

// The README's configuration table is the users' reference: every key must be
// there with its flag and environment variable.
func TestREADMEDocumentsEveryKey(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(raw)
	for _, k := range Keys {
		for _, want := range []string{"`" + k.Name + "`", "`--" + k.Flag + "`", "`" + k.Env + "`"} {
			if !strings.Contains(readme, want) {
				t.Errorf("README.md does not mention %s", want)
			}
		}
	}
}
