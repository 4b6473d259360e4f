package gateway

import (
	"encoding/json"
	"net/http"
	"time"
)

// sseWriter writes Server-Sent Events the way OpenAI streams: each event is one
// "data: <json>" line and a blank line, the stream ends with "data: [DONE]".
type sseWriter struct {
	w       http.ResponseWriter
	rc      *http.ResponseController
	timeout time.Duration // each write's deadline (stall.go); 0: none
	started bool
	alive   time.Time // the last keepAlive
}

func newSSEWriter(w http.ResponseWriter, timeout time.Duration) *sseWriter {
	return &sseWriter{w: w, rc: http.NewResponseController(w), timeout: timeout}
}

// start commits the 200 and the event-stream headers. It is deferred until there
// is something to send, so a job that fails before its first token still gets a
// proper HTTP status.
func (s *sseWriter) start() {
	if s.started {
		return
	}
	s.started = true
	h := s.w.Header()
	h.Set("Content-Type", "text/event-stream; charset=utf-8")
	h.Set("Cache-Control", "no-cache")
	h.Set("Connection", "keep-alive")
	// nginx and similar proxies buffer responses unless told not to.
	h.Set("X-Accel-Buffering", "no")
	s.w.WriteHeader(http.StatusOK)
}

// send writes one event and flushes it; an error means the client is gone, or
// took none of it within the timeout (stalled).
func (s *sseWriter) send(v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return s.raw(data)
}

func (s *sseWriter) raw(data []byte) error {
	s.start()
	buf := make([]byte, 0, len(data)+8)
	buf = append(buf, "data: "...)
	buf = append(buf, data...)
	buf = append(buf, '\n', '\n')
	return s.write(buf)
}

// keepAliveEvery spaces the comments of a held stream.
const keepAliveEvery = time.Second

// keepAlive writes an SSE comment (clients skip it) at most once per
// keepAliveEvery on a started stream: a stream held after lost events sends no
// text until the job ends, and a proxy with an idle timeout would cut it (the
// second pass of round 21: one 3.9 s silence in 40 tokens 100 ms apart); the
// write also notices a client gone.
func (s *sseWriter) keepAlive() error {
	if !s.started || time.Since(s.alive) < keepAliveEvery {
		return nil
	}
	s.alive = time.Now()
	return s.write([]byte(": keepalive\n\n"))
}

func (s *sseWriter) write(buf []byte) error {
	if s.timeout > 0 {
		// Each event gets the whole timeout: a slow reader is fine, one that
		// stopped is dropped. A writer without deadlines refuses (ignored).
		_ = s.rc.SetWriteDeadline(time.Now().Add(s.timeout))
	}
	if _, err := s.w.Write(buf); err != nil {
		return err
	}
	return s.rc.Flush()
}

// done ends the stream the way OpenAI clients expect.
func (s *sseWriter) done() error { return s.raw([]byte("[DONE]")) }
