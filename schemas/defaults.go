package schemas

import (
	"encoding/json"
	"fmt"
	"unicode/utf8"
)

// DefaultMaxTokens bounds a generation whose job names no max_tokens: it runs
// until a stop sequence, EOS or the end of the model's context, and at most this
// many tokens. It is declared once, as the "default" of max_tokens in
// runtime.generate.params.json, which the Python runtime reads too; the worker
// needs it to subtract what an earlier attempt generated.
var DefaultMaxTokens = schemaDefault(RuntimeGenerateParams, "max_tokens")

// MaxAttempt is the highest attempt number the bus schemas accept: the
// "maximum" of attempt in assignment, result, token_event and attempt_report,
// and of attempts in dlq_record (TestMaxAttemptMatchesSchemas keeps them
// equal). Whoever numbers attempts must stay within it: a record or report
// whose attempt is above it fails its schema and is dropped, and a job whose
// every record is dropped never ends.
const MaxAttempt = 100

// schemaDefault reads properties.<field>.default (an integer) of an embedded
// schema. A missing or non-integer default is a build error, so it panics.
func schemaDefault(t Type, field string) int {
	raw, err := Raw(t)
	if err != nil {
		panic(err)
	}
	var doc struct {
		Properties map[string]struct {
			Default *int `json:"default"`
		} `json:"properties"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		panic(err)
	}
	p, ok := doc.Properties[field]
	if !ok || p.Default == nil {
		panic(fmt.Sprintf("schemas: %s has no integer default for %s", t, field))
	}
	return *p.Default
}

// JobHeadroom is what a job's encoding leaves of the bus's max payload: a job
// travels to its worker inside an assignment, with the assignment's own
// fields and the job's attempt, resume count and trace context around it, so a
// job that only just fit JOBS could never be assigned (the dispatcher fails it
// at intake, invalid_request). The producer client refuses a job over
// max payload − JobHeadroom (ErrJobTooLarge), which every dispatcher can carry:
// its own bound (dispatcher/assignsize.go) is looser, and a test keeps it so.
const JobHeadroom = 8 << 10

// MaxErrorMessage is the result schema's bound on an error's message, in
// bytes as Go counts them (maxLength counts characters: never more than
// bytes). Who builds an error (the dispatcher's own records, a worker's
// report of its own invalid record) clips to it with ClipUTF8;
// TestMaxErrorMessageMatchesSchema keeps it equal to result.json.
const MaxErrorMessage = 4096

// ClipUTF8 cuts s to at most n bytes without splitting a UTF-8 sequence.
func ClipUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// JSONPrefix is the length in bytes of the longest prefix of s made of whole
// UTF-8 sequences (an invalid byte counts as one) whose encoding/json
// encoding, quotes aside, takes at most room bytes, and which has at most
// maxChars characters: what of s a JSON document with room bytes for it can
// hold. Who cuts text to fit a message (a worker's record, a dispatcher's own)
// uses it.
func JSONPrefix(s string, room, maxChars int) int {
	n, chars := 0, 0
	for i := 0; i < len(s); {
		r, w := utf8.DecodeRuneInString(s[i:])
		size := w
		switch {
		case r < utf8.RuneSelf:
			switch c := byte(r); {
			case c == '"' || c == '\\' || c == '\n' || c == '\r' || c == '\t':
				size = 2
			case c < 0x20 || c == '<' || c == '>' || c == '&':
				size = 6
			}
		case r == utf8.RuneError && w == 1, r == '\u2028', r == '\u2029':
			size = 6
		}
		if n+size > room || chars+1 > maxChars {
			return i
		}
		n += size
		chars++
		i += w
	}
	return len(s)
}
