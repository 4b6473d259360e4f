package worker

import (
	"encoding/json"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
	"unsafe"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// Coalesce batches token events. Interval is a throttle: a delta goes out at
// once when no event of the job went out within Interval (so the first token, and
// every token of a stream slower than one per Interval, is not delayed at all);
// otherwise it is held until Interval after the last event, together with those
// that follow. Tokens > 1 also sends once that many chunks are pending. The zero
// value sends every chunk at once; Agent's default is DefaultCoalesce.
//
// Why: every event costs a message through the NATS server to the caller and to
// the dispatcher (which tracks the text for resume), each a few syscalls and
// goroutine wake-ups. Where the runtime shares the cores with those processes
// (CPU inference), one event per token takes a large share of generation's CPU
// (BENCHMARKS.md, "bus per-token cost").
type Coalesce struct {
	Interval time.Duration
	Tokens   int
}

// DefaultCoalesce is the Agent's Coalesce when Config leaves it zero: at most one
// event per job every 20 ms (50 a second) — unnoticeable to a reader, and no
// change at all for a stream slower than 50 tokens/s. 5 ms saved little at
// concurrency 8 and 32 on CPU, where a stream's tokens come ~2-6 ms apart; 20 ms
// cut the Go processes' CPU per token by a further quarter to a half there
// (BENCHMARKS.md, "bus per-token cost"). A negative Interval
// (Coalesce{Interval: -1}) turns coalescing off.
var DefaultCoalesce = Coalesce{Interval: 20 * time.Millisecond}

func (c Coalesce) enabled() bool { return c.Interval > 0 || c.Tokens > 1 }

// emitter turns runtime chunks into token events on one job's reply subject
// (and, alsoTo, the same bytes on the worker's progress subject). It is
// the hot path: events are encoded by hand into one reused buffer (the NATS client
// copies on Publish), never validated, and sent as soon as a chunk arrives.
type emitter struct {
	nc       *nats.Conn
	subject  string
	progress string // the same events, for the dispatcher that placed the job (alsoTo)
	mark     string // their reply subject (subjects.Sent)
	prefix   []byte // {"type":"token","job_id":"…","attempt":N,"seq":
	buf      []byte
	resumeN  int
	coalesce Coalesce

	now func() time.Time // time.Now; tests replace it

	mu       sync.Mutex // guards everything below when a coalescing timer runs
	lastPub  time.Time  // when the last event went out (zero: none yet)
	seq      int        // the next seq of this attempt
	offset   int        // bytes of the job's text before the next delta
	tokens   int        // completion tokens of this attempt so far
	text     strings.Builder
	pending  []byte
	pendingN int
	pendingL []schemas.TokenLogprob // logprobs of the pending text, when the job asked for them
	timer    *time.Timer
	stopped  bool
}

func newEmitter(nc *nats.Conn, subject, jobID string, attempt, resumeTokens int, co Coalesce) *emitter {
	e := &emitter{nc: nc, subject: subject, resumeN: resumeTokens, coalesce: co, buf: make([]byte, 0, 256), now: time.Now}
	p := append([]byte(nil), `{"type":"token","job_id":`...)
	p = appendJSONString(p, jobID)
	p = append(p, `,"attempt":`...)
	p = strconv.AppendInt(p, int64(attempt), 10)
	p = append(p, `,"seq":`...)
	e.prefix = p
	return e
}

// startingAt sets the byte offset of this attempt's first delta in the job's text:
// the length of the text a resumed attempt continues, 0 for a fresh one. Every
// event carries its offset, so a caller can tell a continuation from an attempt
// that had to start over (its dispatcher died with what was already sent).
func (e *emitter) startingAt(offset int) *emitter {
	e.offset = offset
	return e
}

// alsoTo sends every event also to progress (subjects.Progress): the
// dispatcher that placed the job tracks what the caller received only from
// there, since any worker credential may publish on a reply subject but only
// this worker's on its progress subject. Without it a retry after this
// worker's silent death would start over.
// mark is the copies' reply subject: a dispatcher drops a progress event
// without one (subjects.Sent).
func (e *emitter) alsoTo(progress, mark string) *emitter {
	e.progress, e.mark = progress, mark
	return e
}

// chunk is the generate's Chunk hook. Empty deltas (text the detokenizer holds
// back) are not sent: they would cost a message and tell the caller nothing.
func (e *emitter) chunk(c *schemas.GenerateChunk) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.tokens = c.Tokens
	if c.Text == "" || e.stopped {
		return
	}
	e.text.WriteString(c.Text)
	if !e.coalesce.enabled() {
		e.publishLocked(c.Text, c.Logprobs)
		return
	}
	e.pending = append(e.pending, c.Text...)
	e.pendingL = append(e.pendingL, c.Logprobs...)
	e.pendingN++
	if e.coalesce.Tokens > 0 && e.pendingN >= e.coalesce.Tokens {
		e.flushLocked()
		return
	}
	if e.timer != nil || e.coalesce.Interval <= 0 {
		return // a flush is already due, or only the token count flushes
	}
	wait := e.coalesce.Interval
	if !e.lastPub.IsZero() {
		wait -= e.now().Sub(e.lastPub)
	}
	if e.lastPub.IsZero() || wait <= 0 {
		e.flushLocked() // nothing went out lately: no reason to hold this one
		return
	}
	e.timer = time.AfterFunc(wait, e.flush)
}

// publishLocked sends one token event.
func (e *emitter) publishLocked(delta string, lps []schemas.TokenLogprob) {
	b := append(e.buf[:0], e.prefix...)
	b = strconv.AppendInt(b, int64(e.seq), 10)
	b = append(b, `,"delta":`...)
	b = appendJSONString(b, delta)
	b = append(b, `,"tokens":`...)
	b = strconv.AppendInt(b, int64(e.resumeN+e.tokens), 10)
	b = append(b, `,"offset":`...)
	b = strconv.AppendInt(b, int64(e.offset), 10)
	if len(lps) > 0 {
		// Only jobs that asked for logprobs pay for encoding/json here.
		if raw, err := json.Marshal(lps); err == nil {
			b = append(b, `,"logprobs":`...)
			b = append(b, raw...)
		}
	}
	b = append(b, '}')
	e.buf = b
	e.seq++
	e.offset += len(delta)
	if e.coalesce.Interval > 0 {
		e.lastPub = e.now()
	}
	if e.subject != "" && e.nc != nil {
		_ = e.nc.Publish(e.subject, b) // a lost event shows as a gap in seq; the result still carries the whole text
		if e.progress != "" {
			// A lost copy leaves a gap the dispatcher sees: it stops tracking the
			// attempt, and a retry starts over instead of resuming with a hole.
			_ = e.nc.PublishRequest(e.progress, e.mark, b)
		}
	}
}

func (e *emitter) flush() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.flushLocked()
}

func (e *emitter) flushLocked() {
	if e.timer != nil {
		e.timer.Stop()
		e.timer = nil
	}
	if e.pendingN == 0 {
		return
	}
	e.publishLocked(unsafe.String(unsafe.SliceData(e.pending), len(e.pending)), e.pendingL)
	e.pending = e.pending[:0]
	e.pendingN = 0
	e.pendingL = nil
}

func (e *emitter) stop() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.stopped = true
	if e.timer != nil {
		e.timer.Stop()
		e.timer = nil
	}
}

const hexDigits = "0123456789abcdef"

// appendJSONString appends s as a JSON string, as encoding/json would (minus its
// HTML escaping): invalid UTF-8 becomes U+FFFD.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i++
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
