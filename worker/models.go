package worker

import (
	"context"
	"slices"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/nats-io/nats.go/jetstream"
)

// modelAnnouncer puts the models the worker serves into subjects.BucketModels, so a
// producer can tell a model nobody serves (refused at once) from one whose
// workers are briefly away (queued). It puts when the set changes and then once
// a minute, well inside the bucket's grace period (10 minutes by default), so a
// busy fleet adds about one write per model per minute per worker.
type modelAnnouncer struct {
	kv   jetstream.KeyValue
	last []string
	at   time.Time
}

const announceEvery = time.Minute

// announce is called from the heartbeat loop with the loaded models.
func (m *modelAnnouncer) announce(ctx context.Context, js jetstream.JetStream, models []string) error {
	if len(models) == 0 || (slices.Equal(models, m.last) && time.Since(m.at) < announceEvery) {
		return nil
	}
	if m.kv == nil {
		kv, err := js.KeyValue(ctx, subjects.BucketModels)
		if err != nil {
			return err
		}
		m.kv = kv
	}
	if err := registry.AnnounceModels(ctx, m.kv, models); err != nil {
		return err
	}
	m.last, m.at = slices.Clone(models), time.Now()
	return nil
}

// announceModels announces the loaded models while the worker can run them.
func (a *Agent) announceModels(ctx context.Context) {
	if st := a.life.get(); st != StateReady && st != StateBusy {
		return
	}
	models, _ := a.sup.loaded()
	if err := a.announcer.announce(ctx, a.js, models); err != nil && ctx.Err() == nil {
		a.log.Warn().Err(err).Msg("could not announce the served models")
	}
}
