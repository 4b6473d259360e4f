package gateway

// The tool-call text parser: what the model generates, turned into content and
// OpenAI tool calls as it arrives (streamed) or at once (whole answers). The
// request side (tools, tool_choice, messages) is in tools.go.

import (
	"crypto/rand"
	"encoding/json"
	"regexp"
	"strings"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// newCallID returns an id in OpenAI's style: call_ and 24 letters or digits.
func newCallID() string {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 24)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return "call_" + string(b)
}

// callHeadRe matches the start of a call's body up to its arguments. Its
// whitespace is JSON's (space, tab, CR, LF), the same scan skips: regexp's \s
// also takes a form feed, so a \f after the colon was skipped when the head
// came whole and sent as arguments when it came a token at a time (CI's
// fuzzing found it).
var callHeadRe = regexp.MustCompile(`^[ \t\r\n]*\{[ \t\r\n]*"name"[ \t\r\n]*:[ \t\r\n]*("(?:[^"\\]|\\.)*")[ \t\r\n]*,[ \t\r\n]*"arguments"[ \t\r\n]*:[ \t\r\n]*`)

// toolParser turns generated text into content and tool calls as it arrives.
// Content is sent as soon as it cannot be the start of a call; trailing whitespace
// is held until text follows (between and around calls it is layout, not content). A call's name goes out once complete, its arguments as they grow.
type toolParser struct {
	raw     string // all text fed
	pos     int    // raw[:pos] is handled
	ws      string // whitespace held back
	content strings.Builder
	calls   []chatToolCall
	cur     *callScan // the call being read, nil outside calls
	// Logprobs entries of tokens whose text is held back: they go out with the
	// next chunk (lpOn: the request asked for logprobs).
	lpOn      bool
	lpPending []schemas.TokenLogprob
}

// callScan follows one call's arguments: a JSON value whose end is found by depth.
type callScan struct {
	named   bool
	args    bool // the arguments' value ended
	started bool
	depth   int
	inStr   bool
	esc     bool
}

// feed takes the next text and returns the content and call deltas it completes.
func (p *toolParser) feed(s string) (string, []toolCallDelta) {
	p.raw += s
	var content strings.Builder
	var deltas []toolCallDelta
	text := func(t string) {
		if t == "" {
			return
		}
		p.ws += t
		n := len(strings.TrimRight(p.ws, " \t\r\n"))
		if n == 0 {
			return
		}
		content.WriteString(p.ws[:n])
		p.content.WriteString(p.ws[:n])
		p.ws = p.ws[n:]
	}
	for {
		rest := p.raw[p.pos:]
		if p.cur == nil {
			i := strings.Index(rest, callOpen)
			if i < 0 {
				keep := partialSuffix(rest, callOpen)
				text(rest[:len(rest)-keep])
				p.pos += len(rest) - keep
				return content.String(), deltas
			}
			text(rest[:i])
			p.ws = ""
			p.pos += i + len(callOpen)
			p.cur = &callScan{}
			continue
		}
		c := p.cur
		if !c.named {
			m := callHeadRe.FindStringSubmatchIndex(rest)
			if m == nil {
				j := strings.Index(rest, callClose)
				if j < 0 {
					return content.String(), deltas // wait for more
				}
				// Not the layout the grammar writes: read the call whole if it is one.
				p.pos += j + len(callClose)
				p.cur = nil
				if d, ok := p.wholeCall(rest[:j]); ok {
					deltas = append(deltas, d...)
				} else {
					text(callOpen + rest[:j+len(callClose)])
				}
				continue
			}
			var name string
			if json.Unmarshal([]byte(rest[m[2]:m[3]]), &name) != nil {
				name = strings.Trim(rest[m[2]:m[3]], `"`)
			}
			c.named = true
			p.calls = append(p.calls, chatToolCall{ID: newCallID(), Type: "function", Function: chatCallFunction{Name: name}})
			k := len(p.calls) - 1
			deltas = append(deltas, toolCallDelta{Index: k, ID: p.calls[k].ID, Type: "function", Function: toolDeltaFields{Name: name}})
			p.pos += m[1]
			continue
		}
		if !c.args {
			from, n, done := c.scan(rest)
			if n > from {
				k := len(p.calls) - 1
				p.calls[k].Function.Arguments += rest[from:n]
				deltas = append(deltas, toolCallDelta{Index: k, Function: toolDeltaFields{Arguments: rest[from:n]}})
			}
			p.pos += n
			if !done {
				return content.String(), deltas
			}
			c.args = true
			continue
		}
		j := strings.Index(rest, callClose)
		if j < 0 {
			return content.String(), deltas
		}
		p.pos += j + len(callClose)
		p.cur = nil
	}
}

// wholeCall reads a call body that is one JSON object {"name", "arguments"}.
func (p *toolParser) wholeCall(body string) ([]toolCallDelta, bool) {
	var v struct {
		Name      string          `json:"name"`
		Arguments json.RawMessage `json:"arguments"`
	}
	if json.Unmarshal([]byte(body), &v) != nil || v.Name == "" {
		return nil, false
	}
	args := string(v.Arguments)
	var s string
	if json.Unmarshal(v.Arguments, &s) == nil {
		args = s // already a JSON string, as OpenAI encodes arguments
	} else if len(v.Arguments) == 0 {
		args = "{}"
	}
	call := chatToolCall{ID: newCallID(), Type: "function", Function: chatCallFunction{Name: v.Name, Arguments: args}}
	p.calls = append(p.calls, call)
	k := len(p.calls) - 1
	return []toolCallDelta{
		{Index: k, ID: call.ID, Type: "function", Function: toolDeltaFields{Name: v.Name}},
		{Index: k, Function: toolDeltaFields{Arguments: args}},
	}, true
}

// scan reads the arguments' JSON value in s: it returns where the value starts
// (leading whitespace skipped), how many bytes of s it consumed and whether the
// value ended there.
func (c *callScan) scan(s string) (from, n int, done bool) {
	for n < len(s) {
		b := s[n]
		if !c.started {
			if b == ' ' || b == '\n' || b == '\t' || b == '\r' {
				n++
				from = n
				continue
			}
			c.started = true
		}
		switch {
		case c.inStr:
			switch {
			case c.esc:
				c.esc = false
			case b == '\\':
				c.esc = true
			case b == '"':
				c.inStr = false
				if c.depth == 0 {
					return from, n + 1, true
				}
			}
		case b == '"':
			c.inStr = true
		case b == '{' || b == '[':
			c.depth++
		case b == '}' || b == ']':
			if c.depth == 0 {
				return from, n, true // the call's own closing brace
			}
			c.depth--
			if c.depth == 0 {
				return from, n + 1, true
			}
		case c.depth == 0 && (b == ',' || b == ' ' || b == '\n' || b == '\t' || b == '\r'):
			return from, n, true // a bare value (number, literal) ended
		}
		n++
	}
	return from, n, false
}

// flush ends the text: what was held back is content now, except whitespace once
// calls were made. A call cut short (max_tokens) keeps what it streamed; one cut
// before its name is content.
func (p *toolParser) flush() (string, []toolCallDelta) {
	var out strings.Builder
	rest := p.raw[p.pos:]
	p.pos = len(p.raw)
	switch {
	case p.cur == nil:
		p.ws += rest
	case !p.cur.named:
		p.ws += callOpen + rest
	}
	p.cur = nil
	if p.ws != "" && (len(p.calls) == 0 || strings.TrimSpace(p.ws) != "") {
		out.WriteString(p.ws)
		p.content.WriteString(p.ws)
	}
	p.ws = ""
	return out.String(), nil
}

// partialSuffix is the length of the longest suffix of s that is a proper prefix
// of marker: text that may still become the marker.
func partialSuffix(s, marker string) int {
	for k := min(len(marker)-1, len(s)); k > 0; k-- {
		if strings.HasSuffix(s, marker[:k]) {
			return k
		}
	}
	return 0
}

// parseToolText reads a whole answer: its content (nil when it is calls only) and
// its calls.
func parseToolText(text string) (*string, []chatToolCall) {
	var p toolParser
	p.feed(text)
	p.flush()
	content := p.content.String()
	if len(p.calls) > 0 && content == "" {
		return nil, p.calls
	}
	return &content, p.calls
}

// toolFinish is OpenAI's finish_reason for an answer with calls: tool_calls when
// generation ended by itself, length when it was cut.
func toolFinish(finish string, calls int) string {
	if calls > 0 && finish == "stop" {
		return "tool_calls"
	}
	return finish
}
