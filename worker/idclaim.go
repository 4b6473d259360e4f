package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jserr"
	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// ErrWorkerIDInUse: another live process heart-beats under this worker id.
var ErrWorkerIDInUse = errors.New("worker: worker id in use by another process")

// A worker id names one process. Two processes under one id both subscribe to
// its assign subject, so both run every job offered to it, at the same attempt:
// callers' streams mixed two texts and gateway streams ended "generated
// different text" with no job restarted, while `status` showed one worker
// (operator red team, round 11). Identically imaged Macs get there with no
// mistake at all: the id defaults to the host name.
//
// claimID refuses to start while another process writes this id's registry
// entry. A fresh entry is not proof: it may be this machine's own previous
// process, killed before it could delete it. So the entry must be written again
// within claimWait of its last write (a live worker puts it every
// HeartbeatInterval) for the id to be taken; a dead one's entry is not, and the
// start goes on once claimWait has passed since that write. The start then
// claims the entry with a write the server makes conditional on the entry
// being as it was read: two processes starting at once (a fleet of identical
// images powered on together) both see no live entry, and only one write
// wins; the other process refuses to start.
func (a *Agent) claimID(ctx context.Context) error {
	reg, err := registry.Open(ctx, a.js)
	if err != nil {
		return nil // no registry yet: nobody heart-beats; the heartbeat loop opens it later
	}
	var rev uint64
	e, err := reg.Entry(ctx, a.cfg.WorkerID)
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted):
		// never written, expired or deleted: nobody heart-beats under it
	case err != nil:
		// Not a reason to stay down: say the check was not made. A
		// credential generated before workers could read their own entry
		// (auth init of an older release) is refused the read.
		a.log.Warn().Err(err).Msg("cannot read this worker id's registry entry: not checked whether another process uses the id")
		return nil
	default:
		if rev, err = a.awaitRewrite(ctx, reg, e); err != nil {
			return err
		}
	}
	if a.beforeClaim != nil {
		a.beforeClaim()
	}
	// The first heartbeat is written conditional on the claim's revision
	// (heartbeat.go): written over unconditionally, a later process's claim
	// made meanwhile was lost and neither process noticed.
	claimed, err := reg.Claim(ctx, a.claimBeat(), rev)
	a.hbRev = claimed
	if err != nil {
		if errors.Is(err, jetstream.ErrKeyExists) || jserr.IsAlreadyStored(err) {
			return fmt.Errorf("%w: worker id %q was claimed by another process starting at the same moment; give each worker process its own --worker-id (the default is the host name)",
				ErrWorkerIDInUse, a.cfg.WorkerID)
		}
		// A bucket that cannot be written is the heartbeat loop's to report.
		a.log.Warn().Err(err).Msg("cannot claim this worker id's registry entry: not checked whether another process starts under the id")
	}
	return nil
}

// awaitRewrite waits claimWait after reading e and refuses the id if the
// entry was written again meanwhile. The wait is measured on this process's
// monotonic clock from the read, not from the entry's store time: that is the
// server's clock, and a worker host 2.5 s ahead of it waited not at all,
// claimed the id from a live process, and that process stopped with its
// running jobs (red team round 18, operator F4: 8 of 8 ended
// attempts_exhausted). The price: a start over a dead process's entry waits
// claimWait in full.
//
// It returns the revision to claim against: the entry's, or 0 when the
// second read found none — the dead process's entry expired (its TTL) or was
// deleted during the wait. Claimed against the first read's revision, that
// claim failed as if another process had taken the id, and `up` restarted
// after a SIGKILL refused to start (red team round 23).
func (a *Agent) awaitRewrite(ctx context.Context, reg registry.Bucket, e jetstream.KeyValueEntry) (uint64, error) {
	t := time.NewTimer(a.claimWait())
	select {
	case <-ctx.Done():
		t.Stop()
		return 0, ctx.Err()
	case <-t.C:
	}
	now, err := reg.Entry(ctx, a.cfg.WorkerID)
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted):
		return 0, nil // gone: created afresh (the claim finds out if another was first)
	case err != nil || now.Revision() == e.Revision():
		return e.Revision(), nil // not written again: its process is gone (the claim finds out if not)
	}
	var hb schemas.HeartbeatMsg
	_ = json.Unmarshal(now.Value(), &hb) // for the message only: what it names is the other process's say
	return 0, fmt.Errorf("%w: worker id %q is heart-beating from host %q (process started %s, state %s); give each worker process its own --worker-id (the default is the host name)",
		ErrWorkerIDInUse, a.cfg.WorkerID, hb.Hostname, hb.StartedAt.Format(time.RFC3339), hb.State)
}

// claimBeat is the entry a start claims the id with: this process, not yet
// able to take work (unavailable), until its first heartbeat.
func (a *Agent) claimBeat() schemas.HeartbeatMsg {
	return schemas.HeartbeatMsg{
		WorkerID: a.cfg.WorkerID, Hostname: a.host.hostname, Platform: a.host.platform, Chip: a.host.chip,
		Models: []string{}, Slots: a.cfg.Slots, State: schemas.WorkerUnavailable, Version: a.cfg.Version,
		StartedAt: a.startedAt, UpdatedAt: time.Now().UTC(),
	}
}

// claimWait is how long after its last write a live worker's entry is written
// again at the latest: two heartbeat periods and slack for a loaded machine.
func (a *Agent) claimWait() time.Duration { return 2*a.cfg.HeartbeatInterval + 500*time.Millisecond }
