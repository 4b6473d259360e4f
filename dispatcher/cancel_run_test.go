package dispatcher

import (
	"context"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/rs/zerolog"
)

// TestRunStopsWhileReadingCancels: SIGTERM while a dispatcher is still reading
// the stored cancels ends Run (red-team F2: the wedged dispatcher needed
// SIGKILL). The read is held in the middle by the log line of the first junk
// cancel. Mutation caught: Run handing watchCancels d.wctx, which outlives ctx.
func TestRunStopsWhileReadingCancels(t *testing.T) {
	t.Parallel()
	e := newEnv(t, jsprov.Options{})
	e.floodCancels(3, func(int) []byte { return []byte("junk") }, 3)
	reading, release := make(chan struct{}), make(chan struct{})
	defer close(release)
	var once sync.Once
	l := zerolog.New(io.Discard).Hook(zerolog.HookFunc(func(_ *zerolog.Event, _ zerolog.Level, m string) {
		if m == logBadCancel {
			once.Do(func() { close(reading) })
			<-release
		}
	}))
	cfg := testConfig("d1", e.connect("d1"))
	cfg.Logger = &l
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	waitClosed(t, reading, 20*time.Second, "the backlog read under way")
	cancel()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return after its context was cancelled during the cancels' backlog")
	}
}
