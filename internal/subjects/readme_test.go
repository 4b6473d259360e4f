package subjects

import (
	"os"
	"strings"
	"testing"
)

// Every stream, bucket and subject pattern is in the README's reference table.
func TestREADMEDocumentsEverySubject(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(raw)
	for _, want := range []string{
		StreamJobs, StreamResults, StreamDLQ, StreamCancels, StreamLedger, BucketWorkers,
		Job("<tenant>", "<priority>", "<job-id>"), JobStored("<priority>"), Result("<tenant>", "<job-id>"), DLQ("<tenant>", "<job-id>"),
		Ledger("<tenant>", "<job-id>"),
		Cancel("<tenant>", "<job-id>"), Attempt("<worker-id>"), Assign("<worker-id>"),
		WorkerCancel("<worker-id>"), Done("<worker-id>", "<dispatcher-id>"), Adopt("<worker-id>"),
		Progress("<worker-id>", "<dispatcher-id>", "<tenant>"),
		Reply("<tenant>", "<job-id>"), strings.Replace(RawDLQ(0), "0", "<jobs-seq>", 1),
	} {
		if !strings.Contains(readme, "`"+want+"`") {
			t.Errorf("README.md does not document `%s`", want)
		}
	}
}
