package gateway

import (
	"fmt"
	"net/http"
)

// MaxBodyValues bounds the JSON values of a request body, counted before the
// body is decoded (bodyTokens). The body budget (bodyBudget) counts raw bytes,
// but decoding multiplies them: an empty object {} is 3 bytes of JSON and about
// 270 bytes of Go map once decoded into map[string]any (response_format's
// schema is), so 3 MB bodies of {"enum":[{},{},...]} from two tenants within
// their shares took the gateway from 23 MB to 1.24 GB in 6 s, each body
// answered 413 only after its decode (red team round 11, F6). Past this bound
// a body is refused unread by the decoder, so what one body decodes into is at
// most about MaxBodyValues × 300 bytes (≈ 40 MB) beside its strings' bytes,
// against the million values (≈ 300 MB) a 3 MB body could hold before.
//
// Every job the schemas accept fits, with room: the most a chat body can carry
// is 256 messages (job.json messages maxItems) of 64 tool calls each, a call
// being 6 tokens ({"id","type","function":{"name","arguments"}} and the comma
// before it) and a message 4 more: 256 × (4 + 64 × 6) = 99,328; tools (128 × 6)
// and their parameters and json_schema together (schemas.MaxSchemaNodes,
// 10,000), logit_bias (300), stop (8), metadata (16) and the top-level fields
// add about 11,200: 110,500 in all, below 2^17 = 131,072. What is left over is
// for content given as arrays of parts, which the job's schema does not bound
// by count (a part is 3 tokens: 40,000 one-character parts still fit).
const MaxBodyValues = 1 << 17

// bodyTokens counts the structural tokens of body that start a value, outside
// strings: 1 for the root, then each '{', '[' and ','. Every value of a JSON
// document is the root, the first member or element of an object or array, or
// follows a comma, so a document holds at most that many values (and as many
// object keys, one per member). It stops counting once past limit, reads each
// byte once and allocates nothing; it does not validate (the decoder does, and
// encoding/json checks a whole document before allocating any of it).
func bodyTokens(body []byte, limit int) int {
	n := 1
	inString := false
	for i := 0; i < len(body); i++ {
		c := body[i]
		if inString {
			switch c {
			case '\\':
				i++ // the escaped byte cannot end the string
			case '"':
				inString = false
			}
			continue
		}
		switch c {
		case '"':
			inString = true
		case '{', '[', ',':
			if n++; n > limit {
				return n
			}
		}
	}
	return n
}

// checkBodyValues refuses a body of more than MaxBodyValues values before it is
// decoded (413 request_too_many_values).
func checkBodyValues(body []byte) *apiError {
	if bodyTokens(body, MaxBodyValues) <= MaxBodyValues {
		return nil
	}
	return &apiError{Status: http.StatusRequestEntityTooLarge, Type: typeInvalidRequest, Code: codeBodyTooManyValues,
		Message: fmt.Sprintf("The request body holds more than %d JSON values (objects, arrays, strings, numbers, booleans and nulls), more than any job can carry.", MaxBodyValues)}
}
