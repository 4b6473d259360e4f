package worker

import (
	"bytes"
	"encoding/json"
	"strconv"
	"unicode/utf8"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// chunkPrefix and the field separators below are what the runtime writes for a
// plain generate.chunk, byte for byte (python/mlx_serving_runtime/protocol.py,
// encode_line: compact separators, keys in this order). One such line per
// running request per decode step is the worker's hottest input.
var (
	chunkPrefix = []byte(`{"jsonrpc":"2.0","method":"generate.chunk","params":{"request_id":"`)
	chunkSeq    = []byte(`","seq":`)
	chunkText   = []byte(`,"text":"`)
	chunkTokens = []byte(`","tokens":`)
	chunkEnd    = []byte(`}}`)
)

// parseChunkLine decodes a plain generate.chunk line into c without reflection.
// It accepts only the exact layout the runtime writes, valid UTF-8 and plain
// decimal integers; for anything else (logprobs, another writer's spacing) it
// returns false and the caller decodes the line with encoding/json, which gives
// the same result.
func parseChunkLine(line []byte, c *schemas.GenerateChunk) bool {
	rest, ok := bytes.CutPrefix(line, chunkPrefix)
	if !ok {
		return false
	}
	rid, rest, ok := cutString(rest, chunkSeq)
	if !ok {
		return false
	}
	seq, rest, ok := cutInt(rest, chunkText)
	if !ok {
		return false
	}
	text, rest, ok := cutString(rest, chunkTokens)
	if !ok {
		return false
	}
	tokens, rest, ok := cutInt(rest, chunkEnd)
	if !ok || len(bytes.TrimSpace(rest)) != 0 {
		return false
	}
	*c = schemas.GenerateChunk{RequestID: rid, Seq: seq, Text: text, Tokens: tokens}
	return true
}

// cutString takes a JSON string body up to its closing quote, which must be
// followed by sep (whose first byte is that quote). A body with escapes (a
// newline, a quote in the text) is unquoted by encoding/json, which also
// refuses a broken escape; a raw control byte or invalid UTF-8 refuses the line.
func cutString(b, sep []byte) (s string, rest []byte, ok bool) {
	end, escaped := -1, false
	for i := 0; i < len(b); i++ {
		switch ch := b[i]; {
		case ch == '"':
			end = i
		case ch == '\\':
			escaped = true
			i++ // the escaped byte cannot end the string
			continue
		case ch < 0x20:
			return "", nil, false
		default:
			continue
		}
		break
	}
	if end < 0 || !bytes.HasPrefix(b[end:], sep) {
		return "", nil, false
	}
	body := b[:end]
	if !utf8.Valid(body) {
		return "", nil, false
	}
	if !escaped {
		return string(body), b[end+len(sep):], true
	}
	// The quotes around the body are b[-1] and b[end]: re-wrap it for the decoder.
	quoted := make([]byte, 0, len(body)+2)
	quoted = append(append(append(quoted, '"'), body...), '"')
	if err := json.Unmarshal(quoted, &s); err != nil {
		return "", nil, false
	}
	return s, b[end+len(sep):], true
}

// cutInt takes a non-negative decimal integer followed by sep.
func cutInt(b, sep []byte) (n int, rest []byte, ok bool) {
	i := 0
	for i < len(b) && b[i] >= '0' && b[i] <= '9' {
		i++
	}
	if i == 0 || i > 9 || (i > 1 && b[0] == '0') || !bytes.HasPrefix(b[i:], sep) {
		return 0, nil, false
	}
	n, err := strconv.Atoi(string(b[:i]))
	if err != nil {
		return 0, nil, false
	}
	return n, b[i+len(sep):], true
}
