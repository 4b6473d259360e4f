package dispatcher

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jsget"
	"github.com/mlx-serving/mlx-serving/internal/jspull"
)

// A stream a dispatcher follows from its first message whose messages any
// producer writes (CANCELS), read through an ephemeral pull consumer of its
// own, pulled by hand (internal/jspull).
//
// Why not nats.go's ordered consumer: its reader took a stored cancel with no
// body and the headers "Status: 409, Description: Consumer Deleted" for the
// server saying the consumer was deleted, made a new consumer, was handed the
// same message, and so on for ever: one such cancel from one tenant turned
// every dispatcher deaf to every tenant's cancels, and after a restart, since
// no job is pulled before the stored cancels are read, no job of any tenant
// ran for the day CANCELS keeps it (red team round 17, tenant F2). Read by
// hand, it is a cancel like any other, and not a valid one.
//
// What the ordered consumer did that this does too: a consumer that is gone
// (deleted, its server restarted, its inactivity threshold passed while the
// dispatcher could not pull) is made again from the message after the last
// one handled, so nothing is skipped and nothing is handled twice.

// followPull bounds one pull: long enough to be cheap when idle, short
// enough that a lost consumer is noticed within seconds.
const followPull = 5 * time.Second

type follower struct {
	d       *Dispatcher
	stream  string
	filter  string
	handle  func(jetstream.Msg)
	read    *atomic.Uint64 // the stream sequence of the last message handled
	mu      sync.Mutex
	cons    jetstream.Consumer
	cancel  context.CancelFunc
	stopped chan struct{}
}

// followStream starts following stream's filter from its first message,
// handing every message to handle (which stores its sequence in read) on one
// goroutine, until the returned follower's stop.
func (d *Dispatcher) followStream(ctx context.Context, stream, filter string, handle func(jetstream.Msg), read *atomic.Uint64) (*follower, error) {
	f := &follower{d: d, stream: stream, filter: filter, handle: handle, read: read, stopped: make(chan struct{})}
	if err := f.consumer(ctx); err != nil {
		return nil, err
	}
	lctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	f.cancel = cancel
	go f.loop(lctx)
	return f, nil
}

// consumer makes the ephemeral consumer, from the message after read.
func (f *follower) consumer(ctx context.Context) error {
	cfg := jetstream.ConsumerConfig{
		FilterSubjects:    []string{f.filter},
		AckPolicy:         jetstream.AckNonePolicy,
		DeliverPolicy:     jetstream.DeliverAllPolicy,
		InactiveThreshold: time.Minute,
		MemoryStorage:     true,
		Replicas:          1,
	}
	if n := f.read.Load(); n > 0 {
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, n+1
	}
	c, err := f.d.js.CreateConsumer(ctx, f.stream, cfg)
	if err != nil {
		return err
	}
	f.mu.Lock()
	old := f.cons
	f.cons = c
	f.mu.Unlock()
	if old != nil {
		_ = f.d.js.DeleteConsumer(ctx, f.stream, old.CachedInfo().Name)
	}
	return nil
}

func (f *follower) loop(ctx context.Context) {
	defer close(f.stopped)
	bytes := streamPullBytes(f.d.nc.MaxPayload())
	for ctx.Err() == nil {
		f.mu.Lock()
		name := f.cons.CachedInfo().Name
		f.mu.Unlock()
		n, err := jspull.Pull(ctx, f.d.nc, jsget.APIPrefix(f.d.js), f.stream, name,
			jspull.Request{Batch: 256, MaxBytes: bytes, Expires: followPull}, func(m jetstream.Msg) {
				if ctx.Err() == nil {
					f.handle(m)
				}
			})
		if ctx.Err() != nil {
			return
		}
		if err == nil && n > 0 {
			continue
		}
		// A pull that ended in an error, or brought nothing: is the consumer
		// still there? (A pull to one that is gone is not answered at all.)
		if err == nil {
			if _, ierr := f.info(ctx); !errors.Is(ierr, jetstream.ErrConsumerNotFound) {
				continue
			}
		}
		f.d.rare.Warn().Err(err).Str("stream", f.stream).Uint64("after", f.read.Load()).Msg("following " + f.stream + ": making its consumer again")
		for ctx.Err() == nil {
			if cerr := f.consumer(ctx); cerr == nil {
				break
			}
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
}

// info is the consumer's info now.
func (f *follower) info(ctx context.Context) (*jetstream.ConsumerInfo, error) {
	f.mu.Lock()
	c := f.cons
	f.mu.Unlock()
	return c.Info(ctx)
}

// stop ends the loop, waiting a moment for a message being handled (a stop
// during the backlog must not wait on a handler that is stuck: the red team's
// wedged dispatcher needed SIGKILL); the consumer goes now, or at its
// inactivity threshold.
func (f *follower) stop() {
	f.cancel()
	select {
	case <-f.stopped:
	case <-time.After(2 * time.Second):
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	f.mu.Lock()
	name := f.cons.CachedInfo().Name
	f.mu.Unlock()
	_ = f.d.js.DeleteConsumer(ctx, f.stream, name)
}
