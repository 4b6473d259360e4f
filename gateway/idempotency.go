package gateway

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Idempotency keys. A client that loses its answer — the gateway restarted, a
// proxy dropped the connection — and sends the request again would run the job
// again: the job id went out with the answer that never came (red team round
// 21: a non-streamed request whose gateway was SIGKILLed, retried as
// openai-python does by default, ran twice). With an Idempotency-Key header
// the job id is derived from the tenant, the key and the choice, so the retry
// names the same job: one finished answers from its record, one still
// running is watched to its end, and nothing runs twice. The key names the
// request: the id's hash covers the job the body asks for (jobFingerprint),
// so the same key with another body is another job. Before, the key named the
// job alone and a retry with another body got the first body's answer, its
// response_format or max_tokens never applied (round 21, "Not fixed").
// The client that sent a key may come back, so the gateway never cancels its
// job (not when it leaves, nor when a sibling choice fails, nor when a submit's
// outcome is unsure): cancelJob holds the tenant's slot until the job ends
// instead. Red team round 21's final review: a cancel there answered the key
// "cancelled" for as long as RESULTS keeps the record, and a leave that only
// returned let a tenant run past its in-flight limit.

// idempotencyHeader is the request header that carries the key.
const idempotencyHeader = "Idempotency-Key"

// maxIdempotencyKey bounds a key's length.
const maxIdempotencyKey = 255

// idempotencyKey is r's key, "" when it sent none; a malformed one is refused.
func idempotencyKey(r *http.Request) (string, *apiError) {
	if len(r.Header.Values(idempotencyHeader)) > 1 {
		// Which one names the job? The first was taken silently (round 22).
		return "", errInvalid(idempotencyHeader, "Send one %s header, not several.", idempotencyHeader)
	}
	key := r.Header.Get(idempotencyHeader)
	if len(key) > maxIdempotencyKey {
		return "", errInvalid(idempotencyHeader, "The %s header is longer than %d bytes.", idempotencyHeader, maxIdempotencyKey)
	}
	for i := 0; i < len(key); i++ {
		if c := key[i]; c < 0x21 || c > 0x7e {
			return "", errInvalid(idempotencyHeader, "The %s header must be printable ASCII without spaces.", idempotencyHeader)
		}
	}
	return key, nil
}

// jobID is the id of choice's job: minted fresh, or with a key keyedJobID.
func jobID(tenant, key, fingerprint string, choice int) string {
	if key == "" {
		return bus.NewJobID()
	}
	return keyedJobID(tenant, key, fingerprint, choice)
}

// jobFingerprint is what a keyed job's id says of the job a request asks for:
// the job as the endpoint decoded it, before the gateway gives it an id, a
// reply subject, a time, a deadline or its tenant's defaults. How the answer
// is delivered (stream, include_usage) and how many choices are asked for are
// not in the job: a streamed retry of a request sent whole, or one asking for
// more choices, names the same jobs.
func jobFingerprint(job *schemas.JobRequest) string {
	b, err := json.Marshal(job) // struct fields in order, map keys sorted: stable
	if err != nil {
		return "" // cannot happen for a decoded job; "" still names one job per key
	}
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// errNotEnded: a job holdUntilEnded waits for has no record yet.
var errNotEnded = errors.New("gateway: the job has not ended")

// keyedJob reports whether id is one keyedJobID makes ("ik" and 40 hex
// digits; a minted id is a ULID, 26 upper-case characters): such a job is
// never cancelled by the gateway (cancelJob).
func keyedJob(id string) bool {
	if len(id) != 42 || !strings.HasPrefix(id, "ik") {
		return false
	}
	_, err := hex.DecodeString(id[2:])
	return err == nil
}

// keyedJobID is the job id tenant's key names for choice (0 for the first)
// of the request whose job has fingerprint: a hash, so it is a valid id
// whatever the key, and another tenant's same key, or the same key with
// another body, names another job.
func keyedJobID(tenant, key, fingerprint string, choice int) string {
	h := sha256.Sum256([]byte(tenant + "\x00" + key + "\x00" + fingerprint + "\x00" + strconv.Itoa(choice)))
	return "ik" + hex.EncodeToString(h[:20])
}

// submit queues job and opens its stream; with a key (spec.key), a job id
// already taken is the earlier try's job, which is watched instead: finished,
// its record is the first event; running, its events from now on, the rest
// coming with the record (the gateway holds after the gap: jobCall.delta).
// watched reports that the stream is of an earlier try's job.
func (g *Gateway) submit(ctx context.Context, job *schemas.JobRequest, spec runSpec) (stream *bus.JobStream, watched bool, err error) {
	stream, err = g.jobs.Submit(ctx, job)
	g.submits.note(err)
	if err != nil && spec.key != "" && errors.Is(err, bus.ErrDuplicate) {
		g.log.Debug().Str("job_id", job.ID).Msg("idempotency key names a job already submitted; watching it")
		stream, err = g.jobs.Watch(ctx, job.Tenant, job.ID, job.ReplyTo)
		return stream, err == nil, err
	}
	return stream, false, err
}

// failure is the answer to the job's record res that did not complete. A
// retry watching an earlier try's job gets a 422 (no client retries it)
// naming what the job ended with: the job is not run again under the key, so
// a 5xx that says "retry" (cancelled, expired, out of attempts) was retried
// in vain for as long as RESULTS keeps the record (round 21's key attack:
// openai-python sent 4 tries to an expired job's key).
func (j *jobCall) failure(res *schemas.ResultMsg) *apiError {
	e := fromResult(res)
	if !j.watched {
		if j.spec.key != "" && (e.Status >= 500 || e.Status == http.StatusTooManyRequests) {
			// A retry under the key names this ended job and can only hear
			// idempotency_key_spent: openai-python retried a keyed 503
			// runtime_busy into a 422 (round 22).
			e.NoRetry = true
			e.Message += fmt.Sprintf(" The job this %s names has ended; retry with a new key.", idempotencyHeader)
		}
		return e
	}
	return &apiError{Status: http.StatusUnprocessableEntity, Type: typeInvalidRequest, Param: idempotencyHeader,
		Code: codeKeySpent, Message: fmt.Sprintf("The job this %s names (%s) ended %s (%s: %s) and is not run again under the key; send a new key to run the request anew.",
			idempotencyHeader, j.job.ID, res.Status, e.Code, e.Message)}
}

// codeKeySpent answers a retry whose key's job ended without completing.
const codeKeySpent = "idempotency_key_spent"

// keyedHolds are the tenant slots held for keyed jobs whose clients left
// (cancelJob), by job id. A job is held once, however many of its tries left;
// and a retry with the key joins the hold of its first choice's job instead of
// taking a slot of its own. Before, the retry a key is for was refused 429 by
// its own first try's hold until the job ended, and each try that left held
// one more slot (round 21's last pass).
//
// Which job a keyed request names is known only once its body is read, so
// while a tenant holds a keyed job its keyed requests read their bodies before
// taking a slot (serve); tenants counts the holds of each tenant for that.
type keyedHolds struct {
	mu      sync.Mutex
	m       map[string]*heldSlot
	tenants map[string]int
}

// holding reports whether tenant holds a keyed job's slot.
func (h *keyedHolds) holding(tenant string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.tenants[tenant] > 0
}

// join returns the slot held for job id with one more holder (the caller's
// done lets it go), or nil when none is held.
func (h *keyedHolds) join(id string) *heldSlot {
	h.mu.Lock()
	defer h.mu.Unlock()
	if s := h.m[id]; s != nil && s.hold() {
		return s
	}
	return nil
}

// start holds slot for job id unless the id is held already or the slot was
// released; it reports whether it holds (then end must follow).
func (h *keyedHolds) start(tenant, id string, slot *heldSlot) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.m[id] != nil || !slot.hold() {
		return false
	}
	if h.m == nil {
		h.m, h.tenants = map[string]*heldSlot{}, map[string]int{}
	}
	h.m[id] = slot
	h.tenants[tenant]++
	return true
}

// end lets go of tenant's job id's hold.
func (h *keyedHolds) end(tenant, id string, slot *heldSlot) {
	h.mu.Lock()
	if h.m[id] == slot {
		delete(h.m, id)
		if h.tenants[tenant]--; h.tenants[tenant] <= 0 {
			delete(h.tenants, tenant)
		}
	}
	h.mu.Unlock()
	slot.done()
}
