package gateway

import (
	"errors"
	"net/http"
	"os"
	"time"
)

// DefaultWriteTimeout bounds one write to a client when Config.WriteTimeout is
// zero.
const DefaultWriteTimeout = 30 * time.Second

// A client that stops reading leaves the handler's write blocked once the
// socket buffers are full. Without a deadline it stayed blocked as long as the
// client kept the connection open — past the request timeout, which bounds the
// wait for the job and not a write — holding its job streams and what they had
// queued (red team round 12, F1: seven handlers still in flight five minutes
// after a 15 s request timeout, 64 MiB of queue each). So every write to a
// client gets a deadline: each SSE event (sseWriter.raw), a whole answer
// (answer), and what the server writes after the handler returns (the end of
// a buffered body, the chunked stream's terminator: writeDeadlines). A client
// that takes no write for that long is dropped: the write fails, the handler
// returns and closes its streams, its jobs are cancelled as for a client that
// left (each still ends with its record, cancelled), and ClientStalled counts
// it. Cancelled, not left running: the handler's return frees the tenant's
// in-flight slots, and a job that ran on would let a tenant that stalls its
// clients have more jobs running than tenant_max_in_flight.

// writeDeadlines bounds what the server writes after next returns: the part
// of a body still buffered, the chunked stream's terminator. net/http clears
// the deadline once the response is finished, so it does not reach the next
// request on a keep-alive connection.
func (g *Gateway) writeDeadlines(next http.Handler) http.Handler {
	if g.writeTimeout <= 0 {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// A writer without deadlines (Handler mounted elsewhere) refuses: the
		// server it is mounted in bounds its writes, or nothing does.
		defer func() { _ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(g.writeTimeout)) }()
		next.ServeHTTP(w, r)
	})
}

// stalled reports a write that failed because the client took none of it
// within the write timeout.
func stalled(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }

// clientGone counts a client whose write failed, logs it, and returns the
// reason its jobs are cancelled with.
func (g *Gateway) clientGone(err error, jobID string) string {
	g.obs.ClientLeft()
	if stalled(err) {
		g.obs.ClientStalled()
		g.log.Warn().Str("job_id", jobID).Dur("write_timeout", g.writeTimeout).
			Msg("client took no write within the write timeout; dropping it and cancelling its job (unless it sent an idempotency key)")
		return "client stopped reading"
	}
	g.log.Info().Str("job_id", jobID).AnErr("cause", err).Msg("client left; cancelling its job (unless it sent an idempotency key)")
	return "client disconnected"
}

// answer writes a whole JSON answer within the write timeout. The job has
// ended already, so a client that does not take it is only counted.
func (g *Gateway) answer(w http.ResponseWriter, v any, jobID string) {
	if g.writeTimeout > 0 {
		_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(g.writeTimeout))
	}
	if err := sendJSON(w, http.StatusOK, v); err != nil && stalled(err) {
		g.obs.ClientStalled()
		g.log.Warn().Str("job_id", jobID).Dur("write_timeout", g.writeTimeout).
			Msg("client took no write of its answer within the write timeout; dropped")
	}
}
