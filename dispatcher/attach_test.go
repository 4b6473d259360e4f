package dispatcher

import (
	"context"
	"errors"
	"net/url"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// A dispatcher started while JetStream does not answer (a cluster electing a
// leader, a server restarting) waits for it instead of exiting, then works.
func TestRunWaitsForJetStream(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	nc := e.connect("d1")
	u, _ := url.Parse(e.srv.ClientURL())
	port, _ := strconv.Atoi(u.Port())
	dir := e.srv.NATSServer().JetStreamConfig().StoreDir

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig("d1", nc)
	var failed <-chan struct{}
	cfg.Logger, failed = logSignal("attaching to JetStream failed; retrying")
	_, stop := runDispatcher(t, cfg) // starts against a server that is down
	defer stop()

	// The server comes back only after Run failed to attach at least once, so
	// what is tested is the retry, not a first attempt that found it up.
	waitClosed(t, failed, 10*time.Second, "a failed attach")
	srv, err := natsserver.Start(ctx, natsserver.Options{Port: port, StoreDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Shutdown(context.Background()) })
	e.srv = srv
	e.nc, e.js = e.connect("test"), nil
	e.js, _ = jetstream.New(e.nc)
	e.kv, _ = e.js.KeyValue(ctx, subjects.BucketWorkers)

	e.startWorker("w1", 2, []string{"m"}, func(schemas.AssignedJob) jobPlan { return jobPlan{} })
	j := newJob("after-restart", "m", "normal")
	c := e.listen(j.ReplyTo)
	e.mustSubmit(j)
	if r := c.wait(t, 15*time.Second); r.Status != schemas.StatusCompleted {
		t.Fatalf("terminal %+v", r)
	}
}

// Streams that do not exist are a setup error, not something to wait for.
func TestRunFailsFastWithoutStreams(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.js.DeleteStream(ctx, subjects.StreamJobs); err != nil {
		t.Fatal(err)
	}
	d, err := New(testConfig("d1", e.connect("d1")))
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Run(ctx); !errors.Is(err, jetstream.ErrStreamNotFound) {
		t.Fatalf("Run without JOBS: %v", err)
	}
}
