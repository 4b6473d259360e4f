package gateway

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"
)

// Request bodies are read only after the caller is authenticated and its tenant
// has a rate token and an in-flight slot (requireTenant, serve), so a stranger or
// a tenant over its limits costs the gateway no body bytes. What is read is then
// bounded three ways, because the gateway may share its process with NATS, the
// dispatcher and a worker (`mlx-serving up`), and running out of memory there
// takes everything down:
//   - each body by its size (413 request_too_large), refused before reading
//     when its Content-Length already says so;
//   - the bodies being read at once by their summed size (503
//     request_body_capacity, with Retry-After), whatever the concurrency;
//   - each body by its read time (408 request_timeout), so a client trickling
//     bytes holds its share of that sum only so long.

// Refusal codes of body reading, stable for clients and dashboards.
const (
	codeBodyTooLarge = "request_too_large"
	codeBodyCapacity = "request_body_capacity"
	codeBodyTimeout  = "request_timeout"
)

const (
	// DefaultMaxBodyBytes is the body limit when Config.MaxBodyBytes is zero:
	// BodyLimitFor the NATS server's default max_payload (1 MiB).
	DefaultMaxBodyBytes = 3 << 20
	// DefaultMaxBodyBytesReading bounds the bytes of bodies being read at once
	// when Config.MaxBodyBytesReading is zero.
	DefaultMaxBodyBytesReading = 32 << 20
	// DefaultBodyReadTimeout bounds reading one body when
	// Config.BodyReadTimeout is zero.
	DefaultBodyReadTimeout = 30 * time.Second
)

// BodyLimitFor is the largest request body that could still become a job of at
// most maxPayload bytes, the bus's message limit (nats.Conn.MaxPayload): a job
// larger than that is refused by the bus anyway (413 from Submit), so reading a
// body beyond this only spends memory. The body may be larger than its job:
// JSON escapes shrink when the job is re-encoded as UTF-8 ("\u00e9", six bytes,
// becomes two; Python's json.dumps escapes every non-ASCII character by
// default, so a body of accented text or emoji is three times its job). Hence
// three times maxPayload; DefaultMaxBodyBytes when maxPayload is unknown (<= 0).
func BodyLimitFor(maxPayload int64) int64 {
	if maxPayload <= 0 {
		return DefaultMaxBodyBytes
	}
	return 3 * maxPayload
}

// byteGate is a counting semaphore of bytes that never waits: a request that
// does not fit now is refused, so a flood cannot queue goroutines either.
type byteGate struct {
	mu       sync.Mutex
	capacity int64
	used     int64
}

// take reserves n bytes; ok is false when they do not fit. release returns them
// once, however often it is called.
func (b *byteGate) take(n int64) (release func(), ok bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.used+n > b.capacity {
		return nil, false
	}
	b.used += n
	var once sync.Once
	return func() {
		once.Do(func() {
			b.mu.Lock()
			b.used -= n
			b.mu.Unlock()
		})
	}, true
}

// readBody reads r's body within the gateway's bounds. release gives its bytes
// back to the shared budget: call it once the body is decoded.
func (g *Gateway) readBody(w http.ResponseWriter, r *http.Request) (body []byte, release func(), aerr *apiError) {
	limit := g.maxBody
	tooLarge := &apiError{Status: http.StatusRequestEntityTooLarge, Type: typeInvalidRequest, Code: codeBodyTooLarge,
		Message: fmt.Sprintf("The request body exceeds %d bytes, the most a job can carry.", limit)}
	if r.ContentLength > limit {
		return nil, nil, tooLarge // said up front: not a byte is read
	}
	// A body of unknown length (chunked) may use all of the limit.
	want := r.ContentLength
	if want < 0 {
		want = limit
	}
	release, ok := g.bodies.take(want)
	if !ok {
		return nil, nil, &apiError{Status: http.StatusServiceUnavailable, Type: typeServer, Code: codeBodyCapacity,
			RetryAfter: g.cfg.RetryAfter, Message: "The gateway is reading as many request bodies as it can hold; retry later."}
	}
	if g.bodyTimeout > 0 {
		// The connection's read deadline, for this body only. net/http lifts it
		// itself when the body reaches EOF (its background read, which notices a
		// client leaving, starts with no deadline), so an answer streamed for
		// minutes is not cut; TestStreamOutlivesItsBodyReadDeadline holds it to
		// that. A body that fails keeps it: the connection is not reused, and a
		// read of its rest fails at once. A handler mounted where the writer
		// cannot set deadlines (ErrNotSupported) reads without one.
		_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(g.bodyTimeout))
	}
	// Sized up front when the length is known, so reading does not grow (and
	// copy) the buffer by doubling; bytes.MinRead is ReadFrom's probe for EOF.
	buf := bytes.NewBuffer(make([]byte, 0, min(want, 64<<10)+bytes.MinRead))
	if r.ContentLength >= 0 {
		buf = bytes.NewBuffer(make([]byte, 0, want+bytes.MinRead))
	}
	_, err := buf.ReadFrom(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		release()
		var mbe *http.MaxBytesError
		var ne net.Error
		switch {
		case errors.As(err, &mbe):
			return nil, nil, tooLarge
		case errors.As(err, &ne) && ne.Timeout():
			return nil, nil, &apiError{Status: http.StatusRequestTimeout, Type: typeInvalidRequest, Code: codeBodyTimeout,
				Message: fmt.Sprintf("The request body was not received within %s.", g.bodyTimeout)}
		}
		return nil, nil, errInvalid("", "Reading the request body failed: %v", err)
	}
	return buf.Bytes(), release, nil
}
