// Package registry is the one access to the worker registry (the
// subjects.BucketWorkers KV bucket: one heartbeat per worker id, expiring by
// TTL): workers Put their heartbeat and Delete it on a clean stop; the
// dispatcher Watches every change; whatever only looks at the fleet (the
// gateway's model list, the fleet metrics, `mlx-serving status`, the bench)
// takes a Snapshot or Gets one worker. It also keeps the models served
// recently (subjects.BucketModels): workers announce theirs, and the
// producer's model check asks ModelServed.
package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// ErrNoRegistry: the bucket does not exist, so no worker ever registered on this
// bus (or it was not provisioned). It wraps jetstream.ErrBucketNotFound.
var ErrNoRegistry = fmt.Errorf("worker registry %s: %w", subjects.BucketWorkers, jetstream.ErrBucketNotFound)

// Snapshot returns every heartbeat in the registry now, sorted by worker id.
//
// It lists the bucket's keys (a STREAM.INFO with a subject filter) and reads
// each key's last message with a direct get: no consumer is created. That is
// the point: whoever may create a consumer may also name its deliver subject,
// and the server does not check that subject against the creator's publish
// grants, so a reader allowed consumers on this bucket could have the server
// push values a worker wrote onto any subject (the red team's R3-1 pushed an
// assignment onto another worker's assign subject). With this, fleet readers
// such as the gateway need only STREAM.INFO and DIRECT.GET on the bucket.
//
// An entry that expires between the listing and its get is left out, as it
// would be a moment later. Entries that are not a live heartbeat (a delete or
// purge marker, not JSON, or a worker id other than the key the server's
// permissions let that worker write) are skipped: one bad writer must not hide
// the fleet. A missing bucket is ErrNoRegistry; callers that treat it as an
// empty fleet test errors.Is(err, ErrNoRegistry).
func Snapshot(ctx context.Context, js jetstream.JetStream) ([]schemas.HeartbeatMsg, error) {
	es, err := Entries(ctx, js)
	if err != nil {
		return nil, err
	}
	out := make([]schemas.HeartbeatMsg, len(es))
	for i, e := range es {
		out[i] = e.Heartbeat
	}
	return out, nil
}

// Get returns the heartbeat of one worker; ok is false when it has none (never
// registered, expired or deleted) or its entry is not a heartbeat.
func Get(ctx context.Context, js jetstream.JetStream, workerID string) (hb schemas.HeartbeatMsg, ok bool, err error) {
	kv, err := js.KeyValue(ctx, subjects.BucketWorkers)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return hb, false, ErrNoRegistry
	}
	if err != nil {
		return hb, false, fmt.Errorf("worker registry %s: %w", subjects.BucketWorkers, err)
	}
	e, err := kv.Get(ctx, workerID)
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return hb, false, nil
	}
	if err != nil {
		return hb, false, fmt.Errorf("worker registry %s: %w", subjects.BucketWorkers, err)
	}
	if hb, err = decode(e.Value()); err != nil || hb.WorkerID == "" {
		return schemas.HeartbeatMsg{}, false, nil
	}
	return hb, true, nil
}

// Bucket is the registry opened once, for a writer that puts often (a worker's
// heartbeat loop).
type Bucket struct{ kv jetstream.KeyValue }

// Open binds the registry bucket; ErrNoRegistry when it does not exist.
func Open(ctx context.Context, js jetstream.JetStream) (Bucket, error) {
	kv, err := js.KeyValue(ctx, subjects.BucketWorkers)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return Bucket{}, ErrNoRegistry
	}
	if err != nil {
		return Bucket{}, fmt.Errorf("worker registry %s: %w", subjects.BucketWorkers, err)
	}
	return Bucket{kv: kv}, nil
}

// Put writes hb as its worker's entry (key hb.WorkerID), restarting its TTL.
func (b Bucket) Put(ctx context.Context, hb schemas.HeartbeatMsg) error {
	if b.kv == nil {
		return ErrNoRegistry // the zero Bucket: never opened
	}
	if hb.WorkerID == "" {
		return errors.New("worker registry: heartbeat without a worker id")
	}
	data, err := json.Marshal(hb)
	if err != nil {
		return err
	}
	_, err = b.kv.Put(ctx, hb.WorkerID, data)
	return err
}

// PutAt writes hb as its worker's entry only if the entry is still at
// revision rev (0: unconditionally, as Put), and returns the revision
// written. A writer that keeps its last revision learns when another process
// wrote the entry since: the write fails (a wrong-last-sequence error).
func (b Bucket) PutAt(ctx context.Context, hb schemas.HeartbeatMsg, rev uint64) (uint64, error) {
	if b.kv == nil {
		return 0, ErrNoRegistry
	}
	if hb.WorkerID == "" {
		return 0, errors.New("worker registry: heartbeat without a worker id")
	}
	data, err := json.Marshal(hb)
	if err != nil {
		return 0, err
	}
	if rev == 0 {
		return b.kv.Put(ctx, hb.WorkerID, data)
	}
	return b.kv.Update(ctx, hb.WorkerID, data, rev)
}

// Entry reads a worker's entry as the bucket holds it, with its revision
// (the bucket's errors as they are: jetstream.ErrKeyNotFound, ErrKeyDeleted).
func (b Bucket) Entry(ctx context.Context, workerID string) (jetstream.KeyValueEntry, error) {
	if b.kv == nil {
		return nil, ErrNoRegistry
	}
	return b.kv.Get(ctx, workerID)
}

// Claim writes hb as the worker's entry only if the entry is still as its
// reader saw it: rev 0 for none (never written, expired or deleted), else
// that revision, and returns the revision written. Of two processes claiming
// one id at once, one gets jetstream.ErrKeyExists (Create) or a
// wrong-last-sequence error (Update): the server orders the writes, whoever
// reads first.
func (b Bucket) Claim(ctx context.Context, hb schemas.HeartbeatMsg, rev uint64) (uint64, error) {
	if b.kv == nil {
		return 0, ErrNoRegistry
	}
	data, err := json.Marshal(hb)
	if err != nil {
		return 0, err
	}
	if rev == 0 {
		return b.kv.Create(ctx, hb.WorkerID, data)
	}
	return b.kv.Update(ctx, hb.WorkerID, data, rev)
}

// Delete removes a worker's entry, so nothing routes to it before its TTL ends.
// The bucket's errors come back as they are (jetstream.ErrKeyNotFound among
// them).
func (b Bucket) Delete(ctx context.Context, workerID string) error {
	if b.kv == nil {
		return ErrNoRegistry // the zero Bucket: never opened
	}
	return b.kv.Delete(ctx, workerID)
}

// DeleteIf removes a worker's entry only while it is still at revision rev
// (a wrong-last-sequence error otherwise): a process deleting the entry it
// read, never one another process wrote since.
func (b Bucket) DeleteIf(ctx context.Context, workerID string, rev uint64) error {
	if b.kv == nil {
		return ErrNoRegistry
	}
	return b.kv.Delete(ctx, workerID, jetstream.LastRevision(rev))
}

// Put is Open then Bucket.Put, for a single write.
func Put(ctx context.Context, js jetstream.JetStream, hb schemas.HeartbeatMsg) error {
	b, err := Open(ctx, js)
	if err != nil {
		return err
	}
	return b.Put(ctx, hb)
}

// Delete removes a worker's entry, so nothing routes to it before its TTL ends.
func Delete(ctx context.Context, js jetstream.JetStream, workerID string) error {
	b, err := Open(ctx, js)
	if err != nil {
		return err
	}
	return b.Delete(ctx, workerID)
}
