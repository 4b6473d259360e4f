package registry

import (
	"context"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// Reader is Snapshot and ModelServed bound to one JetStream context, for a
// component that is handed the fleet as a value instead of a bus connection (the
// gateway's Config.Fleet).
type Reader struct{ js jetstream.JetStream }

// NewReader reads the registry through js.
func NewReader(js jetstream.JetStream) Reader { return Reader{js: js} }

// Snapshot is Snapshot(ctx, js): every heartbeat now, sorted by worker id;
// ErrNoRegistry when the bucket does not exist.
func (r Reader) Snapshot(ctx context.Context) ([]schemas.HeartbeatMsg, error) {
	return Snapshot(ctx, r.js)
}

// Entries is Entries(ctx, js): Snapshot with each entry's store time.
func (r Reader) Entries(ctx context.Context) ([]Entry, error) {
	return Entries(ctx, r.js)
}

// ModelServed is ModelServed(ctx, js, model): whether a worker announced model
// within the models bucket's grace period, or none announced anything (an outage).
func (r Reader) ModelServed(ctx context.Context, model string) (bool, error) {
	return ModelServed(ctx, r.js, model)
}
