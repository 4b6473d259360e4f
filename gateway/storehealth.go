package gateway

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
)

// Readiness from submits. A stream with a critical write error refuses every
// write until its NATS server restarts, and nothing else the gateway reads
// shows it: the workers' bucket may still take heartbeats, so /readyz said
// ready while every submit failed for minutes (red team round 22, F1). up
// stops for a restart on such an error; with an external server it is the
// operator's to restart, and meanwhile /readyz says what the submits meet:
// not ready from a submit the server failed (bus.ErrUnavailable) until one
// succeeds, or for refusedFor after the last failure, so a balancer that took
// the gateway out sends it traffic again to find out.

// refusedFor is how long a failed submit keeps /readyz not ready.
const refusedFor = 10 * time.Second

// submitHealth remembers the last submit the server failed.
type submitHealth struct {
	mu     sync.Mutex
	at     time.Time // zero: the last submit was taken (or none failed)
	reason string
}

// note records a submit's outcome.
func (h *submitHealth) note(err error) {
	switch {
	case err == nil:
		h.mu.Lock()
		h.at, h.reason = time.Time{}, ""
		h.mu.Unlock()
	case errors.Is(err, bus.ErrUnavailable):
		h.mu.Lock()
		h.at, h.reason = time.Now(), err.Error()
		h.mu.Unlock()
	}
}

// check is nil unless a submit failed within refusedFor and none was taken since.
func (h *submitHealth) check() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.at.IsZero() || time.Since(h.at) > refusedFor {
		return nil
	}
	return fmt.Errorf("the job queue failed the last submit %s ago (%s); the NATS server's store may refuse writes until it restarts", time.Since(h.at).Round(time.Second), h.reason)
}
