package gateway

import (
	"bufio"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
)

// streamTexts joins each choice's streamed text, by index, and reports
// whether the stream ended with [DONE].
func streamTexts(t *testing.T, events []string) (map[int]string, bool) {
	t.Helper()
	texts := map[int]string{}
	for _, e := range events {
		var c struct {
			Choices []struct {
				Index int     `json:"index"`
				Text  *string `json:"text"`
				Delta struct {
					Content *string `json:"content"`
				} `json:"delta"`
			} `json:"choices"`
		}
		if json.Unmarshal([]byte(e), &c) != nil {
			continue
		}
		for _, ch := range c.Choices {
			switch {
			case ch.Text != nil:
				texts[ch.Index] += *ch.Text
			case ch.Delta.Content != nil:
				texts[ch.Index] += *ch.Delta.Content
			}
		}
	}
	return texts, len(events) > 0 && events[len(events)-1] == "[DONE]"
}

// A token event lost in the middle of a stream (a NATS reconnect drops core
// messages) leaves a hole the client cannot have: the gateway sends nothing
// more and, at the terminal, the record's text past what was sent. Red team
// round 21: it forwarded the later deltas ("acd"), ended the completed job
// stream_diverged, and with n > 1 cancelled the healthy siblings.
//
// Mutation caught: jobCall.delta not holding on ev.Missed: "acd" and
// stream_diverged: red.
func TestStreamHoldsAfterAGapAndSendsTheRest(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: []string{"a", "b", "c", "d"}, LoseSeq: 1})
	_, srv := newTestGateway(t, tb, nil)

	events, comments := readSSEComments(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(true, nil)))
	texts, done := streamTexts(t, events)
	if texts[0] != "abcd" || !done {
		t.Fatalf("chat: text %q, [DONE] %v; want abcd and [DONE]", texts[0], done)
	}
	// Held, it keeps the connection visibly alive (sseWriter.keepAlive).
	// Mutation caught: streamed without keepAlive: no comment: red.
	if comments == 0 {
		t.Fatal("a held stream sent no keep-alive comment")
	}
	events = readSSE(t, postJSON(t, srv.URL+"/v1/completions", map[string]any{"model": testModel, "prompt": "hi", "n": 2, "stream": true}))
	texts, done = streamTexts(t, events)
	if texts[0] != "abcd" || texts[1] != "abcd" || !done {
		t.Fatalf("completions n=2: texts %v, [DONE] %v; want abcd twice and [DONE] (last event %s)", texts, done, events[len(events)-1])
	}
}

// A gap, then a retry that starts over (its dispatcher lost track of the
// text) and regenerates over the hole: the stream reports a Drop of text the
// client never got; the client's text is what was sent, and the record
// continues it, so the stream ends whole. Second pass of round 21: it ended
// stream_diverged with "ab" though the record was "abcdef".
// Mutation caught: closing testing held && !diverged: stream_diverged: red.
func TestHeldStreamSurvivesARetryThatStartsOver(t *testing.T) {
	t.Parallel()
	tokens := []string{"a", "b", "c", "d", "e", "f"}
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: tokens, LoseSeq: 2, Crash: 4, StartOver: true}, fakeworker.Plan{Tokens: tokens})
	_, srv := newTestGateway(t, tb, nil)
	events := readSSE(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(true, nil)))
	if texts, done := streamTexts(t, events); texts[0] != "abcdef" || !done {
		t.Fatalf("text %q, [DONE] %v (last event %s); want abcdef and [DONE]", texts[0], done, events[len(events)-1])
	}
	// The rest's text offsets count the client's text, not the stream's
	// that the retry rewound.
	// Mutation caught: closing keeping the bus's CharOffset: [0 1 6 7 8 9]: red.
	tokens, offsets := completionLogprobs(t, readSSE(t, postJSON(t, srv.URL+"/v1/completions", map[string]any{"model": testModel, "prompt": "hi", "stream": true, "logprobs": 1})))
	if fmt.Sprint(tokens, offsets) != "[a b c d e f] [0 1 2 3 4 5]" {
		t.Fatalf("completions tokens %v, text offsets %v; want [a b c d e f] [0 1 2 3 4 5]", tokens, offsets)
	}
}

// completionLogprobs joins a streamed completion's logprob tokens and text
// offsets.
func completionLogprobs(t *testing.T, events []string) (tokens []string, offsets []int) {
	t.Helper()
	for _, e := range events {
		var c struct {
			Choices []struct {
				Logprobs *struct {
					Tokens     []string `json:"tokens"`
					TextOffset []int    `json:"text_offset"`
				} `json:"logprobs"`
			} `json:"choices"`
		}
		if json.Unmarshal([]byte(e), &c) != nil || len(c.Choices) == 0 || c.Choices[0].Logprobs == nil {
			continue
		}
		tokens = append(tokens, c.Choices[0].Logprobs.Tokens...)
		offsets = append(offsets, c.Choices[0].Logprobs.TextOffset...)
	}
	return tokens, offsets
}

// A held stream whose job goes quiet (here: blocked before its end) keeps
// sending keep-alive comments, not only when events come (round 21's final
// review: one comment, then 6 s of silence).
// Mutation caught: streamed without its ticker: one comment, then none: red.
func TestHeldStreamKeepsAliveWhileTheJobIsQuiet(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	fw := startFakeWorker(t, tb, fakeworker.Plan{Tokens: []string{"a", "b", "c", "d"}, LoseSeq: 1, Block: true})
	_, srv := newTestGateway(t, tb, nil)
	resp := postJSON(t, srv.URL+"/v1/chat/completions", chatBody(true, nil))
	lines := make(chan string)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	comments := 0
	for deadline := time.After(10 * time.Second); comments < 3; {
		select {
		case l := <-lines:
			if strings.HasPrefix(l, ":") {
				comments++
			}
		case <-deadline:
			t.Fatalf("%d keep-alive comments in 10 s of a held, quiet stream; want 3", comments)
		}
	}
	fw.Release()
	var text strings.Builder
	done := false
	for l := range lines {
		payload, ok := strings.CutPrefix(l, "data: ")
		if !ok {
			continue
		}
		if payload == "[DONE]" {
			done = true
			continue
		}
		texts, _ := streamTexts(t, []string{payload})
		text.WriteString(texts[0])
	}
	if text.String() != "bcd" || !done {
		// "a" came before the comments were counted; the rest with the record.
		t.Fatalf("text after the quiet spell %q, [DONE] %v; want bcd and [DONE]", text.String(), done)
	}
}

// A held stream's rest carries its logprob entries, taken from the record's
// copy where its bytes line up with the rest: every token of the answer has
// its entry once, in order, with the text offsets of the client's text.
// Before, the rest came without entries (round 21, "Not fixed").
// Mutation caught: closing's delta with logprobsOf(nil, ev) again: the
// entries of b, c and d missing: red.
func TestHeldStreamRestCarriesItsLogprobs(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: []string{"a", "b", "c", "d"}, LoseSeq: 1})
	_, srv := newTestGateway(t, tb, nil)

	var chat []string
	for _, e := range readSSE(t, postJSON(t, srv.URL+"/v1/chat/completions", chatBody(true, map[string]any{"logprobs": true, "top_logprobs": 1}))) {
		var c struct {
			Choices []struct {
				Logprobs *struct {
					Content []struct {
						Token   string  `json:"token"`
						Logprob float64 `json:"logprob"`
					} `json:"content"`
				} `json:"logprobs"`
			} `json:"choices"`
		}
		if json.Unmarshal([]byte(e), &c) != nil || len(c.Choices) == 0 || c.Choices[0].Logprobs == nil {
			continue
		}
		for _, en := range c.Choices[0].Logprobs.Content {
			chat = append(chat, fmt.Sprintf("%s%.1f", en.Token, en.Logprob))
		}
	}
	if got := strings.Join(chat, " "); got != "a-0.1 b-0.2 c-0.3 d-0.4" {
		t.Fatalf("chat entries %q, want a-0.1 b-0.2 c-0.3 d-0.4", got)
	}

	tokens, offsets := completionLogprobs(t, readSSE(t, postJSON(t, srv.URL+"/v1/completions", map[string]any{"model": testModel, "prompt": "hi", "stream": true, "logprobs": 1})))
	if fmt.Sprint(tokens, offsets) != "[a b c d] [0 1 2 3]" {
		t.Fatalf("completions tokens %v, text offsets %v; want [a b c d] [0 1 2 3]", tokens, offsets)
	}
}
