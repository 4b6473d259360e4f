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
		JobSubject("<tenant>", "<priority>", "<job-id>"), ResultSubject("<tenant>", "<job-id>"), DLQSubject("<tenant>", "<job-id>"),
		CancelSubject("<tenant>", "<job-id>"), AttemptSubject("<worker-id>"), AssignSubject("<worker-id>"),
		WorkerCancelSubject("<worker-id>"), DoneSubject("<worker-id>", "<dispatcher-id>"),
		ReplySubject("<tenant>", "<job-id>"), strings.Replace(RawDLQSubject(0), "0", "<jobs-seq>", 1),
	} {
		if !strings.Contains(readme, "`"+want+"`") {
			t.Errorf("README.md does not document `%s`", want)
		}
	}
}
