package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// decode is the one reading of a registry entry's value.
func decode(data []byte) (hb schemas.HeartbeatMsg, err error) {
	err = json.Unmarshal(data, &hb)
	return hb, err
}

// Update is one change of the registry as Watch delivers it: a worker's
// heartbeat put, or its entry gone (deleted, purged, or removed by the server
// at its TTL where the bucket leaves a marker).
type Update struct {
	// WorkerID is the entry's key: the id the server's permissions let write it.
	WorkerID string
	// Gone: the entry was deleted or purged; Heartbeat is then zero.
	Gone      bool
	Heartbeat schemas.HeartbeatMsg
	// Written is when the server stored the change (an entry replayed when the
	// watch starts is only as fresh as this).
	Written time.Time
	// Live: a change that happened while the watch ran, not an entry replayed
	// when it (re)started: received now, so as fresh as its receipt, whatever
	// the clocks of the server and the reader say.
	Live bool
}

// WatchOptions shape Watch.
type WatchOptions struct {
	// OnBadEntry is told of an entry that is no heartbeat (it is skipped).
	OnBadEntry func(workerID string, err error)
	// OnRestart is told when the watch ended while its context was live and is
	// about to be opened again (err: why the last attempt failed, if it did).
	OnRestart func(err error)
}

// Watcher follows the registry; see Watch.
type Watcher struct {
	updates chan Update
	cancel  context.CancelFunc
	done    chan struct{}
	bad     atomic.Int64
	restart atomic.Int64
}

// Updates delivers the current entries, then every change, in the bucket's
// order. It is closed once the watch's context ends or Stop is called.
func (w *Watcher) Updates() <-chan Update { return w.updates }

// Stop ends the watch; Updates is closed when it returns (an update not yet
// read is dropped).
func (w *Watcher) Stop() {
	w.cancel()
	<-w.done
}

// BadEntries is how many entries were skipped as no heartbeat.
func (w *Watcher) BadEntries() int64 { return w.bad.Load() }

// Restarts is how many times the watch was opened again after it ended on its
// own.
func (w *Watcher) Restarts() int64 { return w.restart.Load() }

// Watch follows the worker registry until ctx ends: every heartbeat there now,
// then every put, delete and purge, decoded here. An entry that is no heartbeat
// is skipped (counted, and told to OnBadEntry): one bad writer must not hide
// the fleet. Should the underlying watch end while ctx is live (its connection
// closed, its consumer gone), it is opened again with a backoff and replays the
// current entries. The bucket must exist: ErrNoRegistry otherwise.
func Watch(ctx context.Context, js jetstream.JetStream, opts WatchOptions) (*Watcher, error) {
	kv, err := js.KeyValue(ctx, subjects.BucketWorkers)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil, ErrNoRegistry
	}
	if err != nil {
		return nil, fmt.Errorf("worker registry %s: %w", subjects.BucketWorkers, err)
	}
	wctx, cancel := context.WithCancel(ctx)
	kw, err := kv.WatchAll(wctx)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("worker registry %s: watch: %w", subjects.BucketWorkers, err)
	}
	w := &Watcher{updates: make(chan Update), cancel: cancel, done: make(chan struct{})}
	go w.run(wctx, kv, kw, opts)
	return w, nil
}

const (
	restartMin = 100 * time.Millisecond
	restartMax = 5 * time.Second
)

func (w *Watcher) run(ctx context.Context, kv jetstream.KeyValue, kw jetstream.KeyWatcher, opts WatchOptions) {
	defer close(w.done)
	defer close(w.updates)
	wait := restartMin
	for {
		began := time.Now()
		if !w.follow(ctx, kw, opts) {
			_ = kw.Stop()
			return
		}
		_ = kw.Stop()
		// The watch ended on its own: open it again, backing off only when it
		// keeps ending soon.
		if time.Since(began) > time.Minute {
			wait = restartMin
		}
		var err error
		for {
			w.restart.Add(1)
			if opts.OnRestart != nil {
				opts.OnRestart(err)
			}
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			wait = min(2*wait, restartMax)
			if kw, err = kv.WatchAll(ctx); err == nil {
				break
			}
		}
	}
}

// follow forwards kw's entries until it closes (true: it ended on its own) or
// ctx ends (false).
func (w *Watcher) follow(ctx context.Context, kw jetstream.KeyWatcher, opts WatchOptions) bool {
	live := false
	for {
		var e jetstream.KeyValueEntry
		var ok bool
		select {
		case <-ctx.Done():
			return false
		case e, ok = <-kw.Updates():
		}
		if !ok {
			return ctx.Err() == nil
		}
		if e == nil {
			live = true // the end of the current entries
			continue
		}
		u := Update{WorkerID: e.Key(), Written: e.Created(), Live: live}
		switch e.Operation() {
		case jetstream.KeyValuePut:
			hb, err := decode(e.Value())
			if err != nil {
				w.bad.Add(1)
				if opts.OnBadEntry != nil {
					opts.OnBadEntry(e.Key(), err)
				}
				continue
			}
			u.Heartbeat = hb
		case jetstream.KeyValueDelete, jetstream.KeyValuePurge:
			u.Gone = true
		default:
			continue
		}
		select {
		case <-ctx.Done():
			return false
		case w.updates <- u:
		}
	}
}
