package gateway

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
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
//   - the bodies held in memory at once by their summed size (503
//     request_body_capacity, with Retry-After), whatever the concurrency, and
//     each tenant's by a share of that sum, so one tenant cannot starve the
//     others (bodyBudget). Bytes are charged as they arrive, not as declared:
//     a connection that sends a head and no body holds nothing;
//   - each body by its read time (408 request_timeout), so a client trickling
//     bytes holds what it sent only so long;
//   - each body by its JSON values before it is decoded (413
//     request_too_many_values, bodyvalues.go): decoding multiplies bytes, up
//     to 90 times for a body of empty objects, which the byte bounds above
//     cannot see.

// Refusal codes of body reading, stable for clients and dashboards.
const (
	codeBodyTooLarge = "request_too_large"
	codeBodyCapacity = "request_body_capacity"
	codeBodyTimeout  = "request_timeout"
	// codeBodyTooManyValues: the body holds more JSON values than any job
	// can (MaxBodyValues), refused before it is decoded (bodyvalues.go).
	codeBodyTooManyValues = "request_too_many_values"
	// codeBodyEncoding: the body is compressed (a Content-Encoding other
	// than identity); the gateway reads plain JSON only. Read as it came, a
	// gzip body failed as malformed JSON, which named the wrong fault (red
	// team round 18, H-L2).
	codeBodyEncoding = "unsupported_content_encoding"
)

const (
	// DefaultMaxBodyBytes is the body limit when Config.MaxBodyBytes is zero:
	// BodyLimitFor the NATS server's default max_payload (1 MiB).
	DefaultMaxBodyBytes = 3 << 20
	// DefaultMaxBodyBytesReading bounds the bytes of bodies held at once
	// when Config.MaxBodyBytesReading is zero; one tenant may hold a quarter.
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

// readBody reads r's body within the gateway's bounds, charging its bytes to
// tenant as they arrive. release gives them back to the budget: call it once
// the body is decoded (the raw bytes are garbage then).
func (g *Gateway) readBody(w http.ResponseWriter, r *http.Request, tenant string) (body []byte, release func(), aerr *apiError) {
	if enc := r.Header.Get("Content-Encoding"); enc != "" && !strings.EqualFold(enc, "identity") {
		return nil, nil, &apiError{Status: http.StatusUnsupportedMediaType, Type: typeInvalidRequest, Code: codeBodyEncoding,
			Message: fmt.Sprintf("The request body is encoded %q; send it uncompressed.", enc)}
	}
	limit := g.maxBody
	tooLarge := &apiError{Status: http.StatusRequestEntityTooLarge, Type: typeInvalidRequest, Code: codeBodyTooLarge,
		Message: fmt.Sprintf("The request body exceeds %d bytes, the most a job can carry.", limit)}
	if r.ContentLength > limit {
		return nil, nil, tooLarge // said up front: not a byte is read
	}
	// A body of unknown length (chunked) may use all of the limit.
	bound := r.ContentLength
	if bound < 0 {
		bound = limit
	}
	// A declared length reserves nothing (a client could declare and send
	// nothing), but one that cannot fit now is refused before a byte is read:
	// reading it would only end in the same 503.
	declared := r.ContentLength
	if declared < 0 {
		declared = 1 // chunked: at least room for a byte
	}
	if why := g.bodies.fits(tenant, declared); why != bodyFits {
		return nil, nil, g.bodyCapacity(tenant, why)
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
	hold := &bodyHold{budget: g.bodies, tenant: tenant}
	body, err := readCharged(http.MaxBytesReader(w, r.Body, limit), hold, bound)
	if err != nil {
		hold.release()
		var mbe *http.MaxBytesError
		var ne net.Error
		var full errBodyBudget
		switch {
		case errors.As(err, &full):
			return nil, nil, g.bodyCapacity(tenant, full.why)
		case errors.As(err, &mbe):
			return nil, nil, tooLarge
		case errors.As(err, &ne) && ne.Timeout():
			return nil, nil, &apiError{Status: http.StatusRequestTimeout, Type: typeInvalidRequest, Code: codeBodyTimeout,
				Message: fmt.Sprintf("The request body was not received within %s.", g.bodyTimeout)}
		}
		return nil, nil, errInvalid("", "Reading the request body failed: %v", err)
	}
	return body, hold.release, nil
}

// bodyCapacity is the 503 of a body that does not fit the budget. A tenant over
// its share is counted as a tenant refusal: it is that tenant's doing, and the
// others are unaffected.
func (g *Gateway) bodyCapacity(tenant string, why bodyRefusal) *apiError {
	e := &apiError{Status: http.StatusServiceUnavailable, Type: typeServer, Code: codeBodyCapacity, RetryAfter: g.cfg.RetryAfter,
		Message: "The gateway is reading as many request bodies as it can hold; retry later."}
	if why == bodyShareFull {
		g.obs.TenantRefused(tenant, codeBodyCapacity)
		e.Message = fmt.Sprintf("Tenant %q is sending as many request body bytes as one tenant may have read at once (%d); retry later.",
			tenant, g.bodies.share)
	}
	return e
}
