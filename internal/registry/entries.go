package registry

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jsget"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Entry is a heartbeat with the time the server stored it. Staleness is
// judged by StoredAt: the heartbeat's updated_at is the worker's clock, which
// may be skewed against the reader's by any amount.
type Entry struct {
	Heartbeat schemas.HeartbeatMsg
	StoredAt  time.Time
}

// Entries is Snapshot with each entry's store time.
//
// Each key is read with a direct get, parsed here rather than by nats.go: a
// worker's put may carry headers of its own, and the server stores them and
// appends its own (Nats-Sequence, Nats-Time-Stamp) after them in a direct
// get's answer. nats.go reads the first of each and failed on a worker's
// "Nats-Time-Stamp: garbage", and one failed get failed the whole read: one
// worker credential made the gateway answer 503 to every tenant for as long
// as it kept putting (red team round 16, F2); a valid time of its own would
// have set its entry's age. Here the server's value (the last) is taken, and
// an entry that cannot be read is left out like one that is no heartbeat.
func Entries(ctx context.Context, js jetstream.JetStream) ([]Entry, error) {
	s, err := js.Stream(ctx, subjects.WorkersStream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, ErrNoRegistry
	}
	if err != nil {
		return nil, fmt.Errorf("worker registry %s: %w", subjects.BucketWorkers, err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(subjects.WorkerEntries+">"))
	if err != nil {
		return nil, fmt.Errorf("worker registry %s: %w", subjects.BucketWorkers, err)
	}
	out := []Entry{}
	for subj := range info.State.Subjects {
		e, ok, err := entry(ctx, js, subj)
		if err != nil {
			return nil, fmt.Errorf("worker registry %s: %w", subjects.BucketWorkers, err)
		}
		if ok {
			out = append(out, e)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Heartbeat.WorkerID < out[j].Heartbeat.WorkerID })
	return out, nil
}

// entry reads one key's last message: ok only for a put whose value is the
// heartbeat of the worker the key names, with the server's store time. err
// only when the bus cannot be asked (a connection or timeout error): what the
// message holds, however malformed, is the writer's and is only left out.
func entry(ctx context.Context, js jetstream.JetStream, subj string) (Entry, bool, error) {
	m, err := jsget.DirectMsg(ctx, js, subjects.WorkersStream, subj)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return Entry{}, false, nil // the bucket went away meanwhile
	}
	if err != nil {
		return Entry{}, false, err
	}
	seqs := m.Header.Values(jetstream.SequenceHeader)
	if len(seqs) == 0 {
		return Entry{}, false, nil // the server's own answer: not found (expired since the listing)
	}
	stamps := m.Header.Values(jetstream.TimeStampHeaer)
	if len(stamps) == 0 {
		return Entry{}, false, nil
	}
	at, err := time.Parse(time.RFC3339Nano, stamps[len(stamps)-1])
	if err != nil {
		return Entry{}, false, nil
	}
	if op := m.Header.Get("KV-Operation"); op != "" || m.Header.Get("Nats-Marker-Reason") != "" {
		return Entry{}, false, nil // a delete or purge marker
	}
	hb, err := decode(m.Data)
	if err != nil || hb.WorkerID == "" || subjects.WorkerEntries+hb.WorkerID != subj {
		return Entry{}, false, nil
	}
	return Entry{Heartbeat: hb, StoredAt: at}, true, nil
}
