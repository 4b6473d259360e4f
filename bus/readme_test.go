package bus

import (
	"os"
	"strings"
	"testing"
)

// Every stream, bucket and subject pattern is in the README's reference table.
func TestREADMEDocumentsEverySubject(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(raw)
	for _, want := range []string{
		StreamJobs, StreamResults, StreamDLQ, StreamCancels, BucketWorkers,
		JobSubject("<priority>", "<job-id>"), ResultSubject("<tenant>", "<job-id>"), DLQSubject("<job-id>"),
		CancelSubject("<job-id>"), AttemptSubject("<job-id>"), AssignSubject("<worker-id>"),
		ReplySubject("<tenant>", "<job-id>"),
	} {
		if !strings.Contains(readme, "`"+want+"`") {
			t.Errorf("README.md does not document `%s`", want)
		}
	}
}
