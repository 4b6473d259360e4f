package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// registry answers "which models can the fleet run now" from the worker registry
// bucket. Reading the bucket costs a consumer round trip, so the answer is kept
// for ttl: a worker that just appeared is seen within that much time.
type registry struct {
	js  jetstream.JetStream
	ttl time.Duration

	mu     sync.Mutex // held across a refresh, so concurrent requests share one
	at     time.Time
	models map[string]time.Time // model -> earliest StartedAt of a ready worker with it
}

func newRegistry(js jetstream.JetStream, ttl time.Duration) *registry {
	return &registry{js: js, ttl: ttl}
}

// readyModels returns the models loaded on ready workers.
func (r *registry) readyModels(ctx context.Context) (map[string]time.Time, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.models != nil && time.Since(r.at) < r.ttl {
		return r.models, nil
	}
	models, err := readRegistry(ctx, r.js)
	if err != nil {
		return nil, err
	}
	r.models, r.at = models, time.Now()
	return models, nil
}

func (r *registry) hasModel(ctx context.Context, model string) (bool, error) {
	models, err := r.readyModels(ctx)
	if err != nil {
		return false, err
	}
	_, ok := models[model]
	return ok, nil
}

// readRegistry reads every heartbeat in the bucket once.
func readRegistry(ctx context.Context, js jetstream.JetStream) (map[string]time.Time, error) {
	kv, err := js.KeyValue(ctx, bus.BucketWorkers)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return map[string]time.Time{}, nil // no worker ever registered
	}
	if err != nil {
		return nil, fmt.Errorf("worker registry: %w", err)
	}
	w, err := kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("worker registry: %w", err)
	}
	defer func() { _ = w.Stop() }()
	models := map[string]time.Time{}
	for {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("worker registry: %w", ctx.Err())
		case e, ok := <-w.Updates():
			if !ok {
				return nil, errors.New("worker registry: watcher closed")
			}
			if e == nil {
				// The watcher marks the end of the current values with nil.
				return models, nil
			}
			var hb schemas.HeartbeatMsg
			if err := json.Unmarshal(e.Value(), &hb); err != nil || hb.State != schemas.WorkerReady {
				continue
			}
			for _, m := range hb.Models {
				if t, seen := models[m]; !seen || hb.StartedAt.Before(t) {
					models[m] = hb.StartedAt
				}
			}
		}
	}
}

type modelObject struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
}

type modelList struct {
	Object string        `json:"object"`
	Data   []modelObject `json:"data"`
}

func newModelObject(id string, since time.Time) modelObject {
	created := since.Unix()
	if since.IsZero() {
		created = 0
	}
	return modelObject{ID: id, Object: "model", Created: created, OwnedBy: "mlx-serving"}
}

func (g *Gateway) registryContext(r *http.Request) (context.Context, context.CancelFunc) {
	return context.WithTimeout(r.Context(), 5*time.Second)
}

// handleModels is GET /v1/models: the models loaded across the fleet.
func (g *Gateway) handleModels(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := g.registryContext(r)
	defer cancel()
	models, err := g.registry.readyModels(ctx)
	if err != nil {
		g.log.Warn().Err(err).Msg("reading the worker registry failed")
		writeError(w, errUnavailable("The worker registry is unavailable."))
		return
	}
	out := modelList{Object: "list", Data: make([]modelObject, 0, len(models))}
	for id, since := range models {
		out.Data = append(out.Data, newModelObject(id, since))
	}
	sort.Slice(out.Data, func(i, j int) bool { return out.Data[i].ID < out.Data[j].ID })
	writeJSON(w, http.StatusOK, out)
}

// handleModel is GET /v1/models/{model}; model names may contain slashes.
func (g *Gateway) handleModel(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("model")
	ctx, cancel := g.registryContext(r)
	defer cancel()
	models, err := g.registry.readyModels(ctx)
	if err != nil {
		g.log.Warn().Err(err).Msg("reading the worker registry failed")
		writeError(w, errUnavailable("The worker registry is unavailable."))
		return
	}
	since, ok := models[id]
	if !ok {
		writeError(w, &apiError{Status: http.StatusNotFound, Type: typeInvalidRequest, Param: "model", Code: "model_not_found",
			Message: fmt.Sprintf("The model %q is not loaded on any ready worker.", id)})
		return
	}
	writeJSON(w, http.StatusOK, newModelObject(id, since))
}
