package worker

import (
	"encoding/json"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// The hand-written encoder must produce what encoding/json would decode back to
// the same string, for any bytes the runtime might send (including broken UTF-8).
func TestAppendJSONStringRoundTrip(t *testing.T) {
	t.Parallel()
	cases := []string{"", "plain", `quote " back \ slash`, "nl\n cr\r tab\t nul\x00 bell\x07 esc\x1b",
		"ünïcødé 日本語 🙂", "\u2028\u2029", "bad \xff\xfe utf8 \xe2\x82", "<html>&amp;"}
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 2000; i++ {
		b := make([]byte, r.IntN(24))
		for j := range b {
			b[j] = byte(r.IntN(256))
		}
		cases = append(cases, string(b))
	}
	for _, s := range cases {
		enc := appendJSONString(nil, s)
		var got string
		if err := json.Unmarshal(enc, &got); err != nil {
			t.Fatalf("%q encodes to invalid JSON %s: %v", s, enc, err)
		}
		std, _ := json.Marshal(s)
		var want string
		_ = json.Unmarshal(std, &want)
		if got != want {
			t.Fatalf("%q: decoded %q, encoding/json gives %q", s, got, want)
		}
	}
}

func TestEmitterEventsMatchSchema(t *testing.T) {
	t.Parallel()
	e := newEmitter(nil, "", "job-1", 3, 5, Coalesce{})
	for i, d := range []string{"Hello", " \"wor\nld\"", "\xff"} {
		e.chunk(&schemas.GenerateChunk{RequestID: "job-1.3", Seq: i, Text: d, Tokens: i + 1})
		if err := schemas.Validate(schemas.TokenEvent, e.buf); err != nil {
			t.Fatalf("event %s: %v", e.buf, err)
		}
		var ev schemas.TokenEventMsg
		if err := json.Unmarshal(e.buf, &ev); err != nil {
			t.Fatal(err)
		}
		if ev.Type != "token" || ev.JobID != "job-1" || ev.Attempt != 3 || ev.Seq != i || ev.Tokens != 5+i+1 {
			t.Fatalf("event %d: %+v", i, ev)
		}
	}
	// An empty delta is not an event, but its token count is kept.
	e.chunk(&schemas.GenerateChunk{Seq: 3, Text: "", Tokens: 9})
	if e.seq != 3 || e.tokens != 9 {
		t.Fatalf("empty delta: seq %d tokens %d", e.seq, e.tokens)
	}
}

func TestEmitterCoalesce(t *testing.T) {
	t.Parallel()
	e := newEmitter(nil, "", "j", 1, 0, Coalesce{Tokens: 3, Interval: time.Hour})
	for i := 0; i < 7; i++ {
		e.chunk(&schemas.GenerateChunk{Seq: i, Text: "a", Tokens: i + 1})
	}
	// The first goes at once (nothing went out within the interval), then two
	// events of three chunks each.
	if e.seq != 3 {
		t.Fatalf("7 chunks, the first alone then by 3: %d events, want 3", e.seq)
	}
	e.flush()
	var ev schemas.TokenEventMsg
	_ = json.Unmarshal(e.buf, &ev)
	if e.seq != 3 || ev.Delta != "aaa" || ev.Tokens != 7 {
		t.Fatalf("after flush: seq %d last %+v", e.seq, ev)
	}
	// Time-based: the first delta goes at once, the held one by itself.
	e2 := newEmitter(nil, "", "j", 1, 0, Coalesce{Interval: 20 * time.Millisecond})
	e2.chunk(&schemas.GenerateChunk{Text: "x", Tokens: 1})
	e2.chunk(&schemas.GenerateChunk{Text: "y", Tokens: 2})
	deadline := time.Now().Add(5 * time.Second)
	for {
		e2.mu.Lock()
		n := e2.seq
		e2.mu.Unlock()
		if n == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("interval flush never happened")
		}
		time.Sleep(5 * time.Millisecond)
	}
	e2.stop()
}

// The interval is a throttle, not a delay: a delta goes out at once when no event
// went out within the interval (the first token, any slow stream), and only
// deltas that follow an event closely are held, then sent as one.
// Mutation caught: arming the timer for every pending delta (dropping the
// "nothing went out lately" flush) holds the first token back.
func TestEmitterThrottle(t *testing.T) {
	t.Parallel()
	clock := time.Unix(1000, 0)
	e := newEmitter(nil, "", "j", 1, 0, Coalesce{Interval: time.Hour})
	e.now = func() time.Time { return clock }
	defer e.stop()
	last := func() schemas.TokenEventMsg {
		var ev schemas.TokenEventMsg
		if err := json.Unmarshal(e.buf, &ev); err != nil {
			t.Fatal(err)
		}
		return ev
	}
	e.chunk(&schemas.GenerateChunk{Text: "a", Tokens: 1})
	if e.seq != 1 || last().Delta != "a" {
		t.Fatalf("first delta held: seq %d", e.seq)
	}
	clock = clock.Add(time.Minute)
	e.chunk(&schemas.GenerateChunk{Text: "b", Tokens: 2})
	clock = clock.Add(time.Minute)
	e.chunk(&schemas.GenerateChunk{Text: "c", Tokens: 3})
	if e.seq != 1 {
		t.Fatalf("deltas within the interval sent at once: seq %d", e.seq)
	}
	e.flush() // what the timer does when the interval is over
	if ev := last(); e.seq != 2 || ev.Delta != "bc" || ev.Tokens != 3 || ev.Offset != 1 {
		t.Fatalf("held deltas: seq %d event %+v, want one event \"bc\" at offset 1", e.seq, ev)
	}
	clock = clock.Add(2 * time.Hour)
	e.chunk(&schemas.GenerateChunk{Text: "d", Tokens: 4})
	if ev := last(); e.seq != 3 || ev.Delta != "d" || ev.Offset != 3 {
		t.Fatalf("a delta after a quiet interval was held: seq %d event %+v", e.seq, ev)
	}
}

// Agents coalesce unless told not to; a negative interval sends every chunk.
// Mutation caught: dropping the default in Config.defaults.
func TestCoalesceDefault(t *testing.T) {
	t.Parallel()
	c := Config{WorkerID: "w"}
	if err := c.defaults(); err != nil {
		t.Fatal(err)
	}
	if c.Coalesce != DefaultCoalesce || !c.Coalesce.enabled() {
		t.Fatalf("default coalesce %+v, want %+v", c.Coalesce, DefaultCoalesce)
	}
	off := Config{WorkerID: "w", Coalesce: Coalesce{Interval: -1}}
	if err := off.defaults(); err != nil {
		t.Fatal(err)
	}
	if off.Coalesce.enabled() {
		t.Fatalf("negative interval still coalesces: %+v", off.Coalesce)
	}
}
