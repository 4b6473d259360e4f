package gateway

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"sync"
	"time"

	fleetreg "github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// registry answers "which models can the fleet run now" from the worker registry
// (Config.Fleet). Reading it costs a consumer round trip, so the answer is kept
// for ttl: a worker that just appeared is seen within that much time. Whether a
// model that no ready worker has now was served lately is the models bucket's
// answer (Fleet.ModelServed), the one the producers' check gives too: a worker
// restarting its runtime, or replaced by another, leaves its model away for a
// while, and requests for it are 503 (retried by clients) rather than 404 (which
// clients do not retry), since it is expected back — also across a gateway
// restart, which remembers nothing.
type registry struct {
	fleet Fleet
	ttl   time.Duration
	// staleAfter: a heartbeat older than this is no worker's word now (see
	// readRegistry); zero: heartbeats are taken at any age.
	staleAfter time.Duration

	mu   sync.Mutex // held across a refresh, so concurrent requests share one
	at   time.Time
	view *fleetView
}

// fleetView is one read of the registry bucket.
type fleetView struct {
	ready   map[string]time.Time // model -> earliest StartedAt of a ready worker with it
	workers int                  // heartbeats in the bucket
	serving int                  // ready workers with at least one model loaded
	stale   int                  // heartbeats older than staleAfter (not counted serving)
}

// modelStatus is what the fleet knows of a model a request names.
type modelStatus int

const (
	modelUnknown modelStatus = iota // no worker announced it within the models bucket's grace period
	modelAway                       // announced within it (or the fleet is down), but no ready worker has it now
	modelServed                     // a ready worker has it loaded
)

func newRegistry(fleet Fleet, ttl, staleAfter time.Duration) *registry {
	return &registry{fleet: fleet, ttl: ttl, staleAfter: staleAfter}
}

// read returns the current view, reading the bucket when the kept one is stale.
func (r *registry) read(ctx context.Context) (*fleetView, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.view != nil && time.Since(r.at) < r.ttl {
		return r.view, nil
	}
	view, err := readRegistry(ctx, r.fleet, r.staleAfter, time.Now())
	if err != nil {
		return nil, err
	}
	r.view, r.at = view, time.Now()
	return view, nil
}

// readyModels returns the models loaded on ready workers.
func (r *registry) readyModels(ctx context.Context) (map[string]time.Time, error) {
	v, err := r.read(ctx)
	if err != nil {
		return nil, err
	}
	return v.ready, nil
}

func (r *registry) status(ctx context.Context, model string) (modelStatus, error) {
	v, err := r.read(ctx)
	if err != nil {
		return modelUnknown, err
	}
	if _, ok := v.ready[model]; ok {
		return modelServed, nil
	}
	served, err := r.fleet.ModelServed(ctx, model)
	if err != nil {
		return modelUnknown, err
	}
	if served {
		return modelAway, nil
	}
	return modelUnknown, nil
}

// readRegistry reads every heartbeat in the registry once. A heartbeat older
// than staleAfter (when set) at now is counted stale, not serving: the bucket
// expires an entry one worker TTL after its last write, so one much older means
// the store applies neither writes nor limits — a full disk, where heartbeats,
// records and submits all fail — and /readyz then said ready (operator round
// 2, F2). Its worker may well run; nothing it does can be stored.
func readRegistry(ctx context.Context, fleet Fleet, staleAfter time.Duration, now time.Time) (*fleetView, error) {
	view := &fleetView{ready: map[string]time.Time{}}
	es, err := fleet.Entries(ctx)
	if errors.Is(err, fleetreg.ErrNoRegistry) {
		return view, nil // no worker ever registered
	}
	if err != nil {
		return nil, err
	}
	for _, e := range es {
		hb := e.Heartbeat
		view.workers++
		// The server's clock: an honest worker's own may be skewed.
		if staleAfter > 0 && now.Sub(e.StoredAt) > staleAfter {
			view.stale++
			continue
		}
		if hb.State != schemas.WorkerReady || len(hb.Models) == 0 {
			continue
		}
		view.serving++
		for _, m := range hb.Models {
			if t, seen := view.ready[m]; !seen || hb.StartedAt.Before(t) {
				view.ready[m] = hb.StartedAt
			}
		}
	}
	return view, nil
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

// fleetModels reads the models the fleet can run now, or answers 503 and
// returns false when the worker registry cannot be read.
func (g *Gateway) fleetModels(w http.ResponseWriter, r *http.Request) (map[string]time.Time, bool) {
	ctx, cancel := g.registryContext(r)
	defer cancel()
	models, err := g.registry.readyModels(ctx)
	if err != nil {
		g.log.Warn().Err(err).Msg("reading the worker registry failed")
		writeError(w, errUnavailable("The worker registry is unavailable."))
		return nil, false
	}
	return models, true
}

// handleModels is GET /v1/models: the models loaded across the fleet.
func (g *Gateway) handleModels(w http.ResponseWriter, r *http.Request) {
	models, ok := g.fleetModels(w, r)
	if !ok {
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
	models, ok := g.fleetModels(w, r)
	if !ok {
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
