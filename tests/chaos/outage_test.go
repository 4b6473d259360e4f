package chaos

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Jobs submitted while no worker runs survive a SIGKILL of the whole stack —
// the NATS server (sync_interval: always, from ops/nats/standalone.conf) and
// the dispatcher — and all complete once everything is back, their results
// retrievable by id.
func TestOutageReplay(t *testing.T) {
	jobs := 500
	if v := os.Getenv("CHAOS_OUTAGE_JOBS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("CHAOS_OUTAGE_JOBS=%q", v)
		}
		jobs = n
	}
	natsBin, _ := binaries(t)
	runDir := keepOnFailure(t, "mlx-chaos-outage-")
	store := filepath.Join(runDir, "nats-store")
	ns := startStandalone(t, natsBin, runDir, store)
	ctx := testContext(t, 5*time.Minute)
	f := newFleet(t, runDir, ns, 3, 8)
	d := f.addDispatcher(ctx, "d1") // provisions the streams

	// Workers are down: every job waits in JOBS.
	p, err := bus.NewClient(f.nc)
	if err != nil {
		t.Fatal(err)
	}
	ids := make([]string, jobs)
	for i := range jobs {
		job := &schemas.JobRequest{ID: fmt.Sprintf("outage%04d", i), Model: f.modelID(), Prompt: fmt.Sprintf("outage job %d", i), MaxTokens: 8}
		if _, err := p.Submit(ctx, job); err != nil {
			t.Fatalf("submit %d: %v", i, err)
		}
		ids[i] = job.ID
	}
	if n, err := streamMsgs(ctx, f.js, subjects.StreamJobs); err != nil || n != jobs {
		t.Fatalf("JOBS holds %d messages (%v), want %d", n, err, jobs)
	}

	// The whole stack dies at once, without a chance to flush anything.
	d.kill()
	ns.nodes[0].kill()
	t.Logf("SIGKILLed the dispatcher and nats-server with %d jobs queued", jobs)

	if err := ns.nodes[0].restart(ctx); err != nil {
		t.Fatal(err)
	}
	if n, err := streamMsgs(ctx, f.js, subjects.StreamJobs); err != nil || n != jobs {
		t.Fatalf("after the restart JOBS holds %d messages (%v), want %d", n, err, jobs)
	}
	if err := f.startDispatcher(ctx, d); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 2; i++ {
		f.addWorker(ctx, fmt.Sprintf("ow%d", i))
	}

	// Every job completes; RESULTS is the only record there is (no caller listened).
	if err := poll(ctx, 200*time.Millisecond, func() bool {
		n, err := streamMsgs(ctx, f.js, subjects.StreamResults)
		return err == nil && n >= jobs
	}); err != nil {
		n, _ := streamMsgs(ctx, f.js, subjects.StreamResults)
		f.dumpLogs(20)
		t.Fatalf("%d/%d results after the outage: %v", n, jobs, err)
	}
	counts, err := resultCounts(ctx, f.js)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		r, err := results.Fetch(ctx, f.js, "", id)
		if err != nil {
			t.Errorf("%s: %v", id, err)
			continue
		}
		if r.Status != schemas.StatusCompleted || r.Text == "" {
			t.Errorf("%s: %s %q %+v", id, r.Status, r.Text, r.Error)
		}
		if n := counts[subjects.Result("", id)]; n != 1 {
			t.Errorf("%s: %d records in RESULTS", id, n)
		}
	}
	if n, err := streamMsgs(ctx, f.js, subjects.StreamJobs); err != nil || n != 0 {
		t.Errorf("JOBS holds %d messages (%v) after every job completed", n, err)
	}
	checkSyncAlways(t, ns.nodes[0])
}

// checkSyncAlways asserts the running server fsyncs every write, as its
// /varz reports: the durability claims of docs/RELIABILITY.md rest on it.
func checkSyncAlways(t testing.TB, n *natsNode) {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/varz", n.httpPort))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v struct {
		JetStream struct {
			Config struct {
				SyncAlways bool `json:"sync_always"`
			} `json:"config"`
		} `json:"jetstream"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		t.Fatal(err)
	}
	if !v.JetStream.Config.SyncAlways {
		t.Fatalf("%s runs without sync_interval: always", n.name)
	}
}
