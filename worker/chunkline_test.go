package worker

import (
	"encoding/json"
	"math/rand/v2"
	"reflect"
	"strconv"
	"testing"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// pyChunkLine is the line the runtime writes for a plain chunk (protocol.py's
// encode_line): compact, keys in order, strings escaped by json's
// encode_basestring (non-ASCII raw).
func pyChunkLine(rid string, seq int, text string, tokens int) []byte {
	q := func(s string) string {
		b, _ := json.Marshal(s) // same escapes for what matters here; HTML escapes refuse the fast path
		return string(b)
	}
	return []byte(`{"jsonrpc":"2.0","method":"generate.chunk","params":{"request_id":` + q(rid) +
		`,"seq":` + strconv.Itoa(seq) + `,"text":` + q(text) + `,"tokens":` + strconv.Itoa(tokens) + `}}`)
}

// Whatever the line, the fast path either declines or decodes exactly what
// encoding/json decodes; and it takes the runtime's plain chunks.
// Mutation caught: dropping `escaped = true` in cutString returns "a\\nb"
// (still escaped) as the text of a chunk whose text is "a\nb".
func TestParseChunkLineMatchesJSON(t *testing.T) {
	t.Parallel()
	lines := [][]byte{
		pyChunkLine("job-1.1", 0, "Hello", 1),
		pyChunkLine("j.2", 17, " wörld 日本 🙂", 18),
		pyChunkLine("j", 3, "a\nb", 4),
		pyChunkLine("j", 3, `say "hi" \ ok`, 4),
		pyChunkLine("j", 3, "", 0),
		[]byte(`{"jsonrpc":"2.0","method":"generate.chunk","params":{"request_id":"j","seq":01,"text":"a","tokens":2}}`),
		[]byte(`{"jsonrpc":"2.0","method":"generate.chunk","params":{"request_id":"j","seq":1,"text":"a","tokens":2,"logprobs":[]}}`),
		[]byte(`{"jsonrpc":"2.0","method":"generate.chunk","params":{"request_id":"j","seq":1,"text":"a","tokens":2}} x`),
		[]byte(`{"jsonrpc":"2.0","method":"generate.chunk","params":{"request_id":"j","seq":-1,"text":"a","tokens":2}}`),
		[]byte("{\"jsonrpc\":\"2.0\",\"method\":\"generate.chunk\",\"params\":{\"request_id\":\"j\",\"seq\":1,\"text\":\"\xff\",\"tokens\":2}}"),
	}
	r := rand.New(rand.NewPCG(3, 4))
	alphabet := []rune("ab \n\t\"\\/é日🙂\x00\x1f<>&")
	for range 3000 {
		rs := make([]rune, r.IntN(12))
		for i := range rs {
			rs[i] = alphabet[r.IntN(len(alphabet))]
		}
		line := pyChunkLine("r"+strconv.Itoa(r.IntN(99)), r.IntN(1<<20), string(rs), r.IntN(1<<15))
		if r.IntN(4) == 0 { // damage it somewhere
			i := r.IntN(len(line))
			line = append(line[:i:i], line[i+1:]...)
		}
		lines = append(lines, line)
	}
	fast := 0
	for _, line := range lines {
		var got schemas.GenerateChunk
		if !parseChunkLine(line, &got) {
			continue
		}
		fast++
		var m struct {
			Method string                `json:"method"`
			Params schemas.GenerateChunk `json:"params"`
		}
		if err := json.Unmarshal(line, &m); err != nil {
			t.Fatalf("fast path took a line encoding/json refuses: %s (%v)", line, err)
		}
		if m.Method != schemas.NotifyGenerateChunk || !reflect.DeepEqual(got, m.Params) {
			t.Fatalf("line %s: fast path %+v, encoding/json %+v", line, got, m.Params)
		}
	}
	var plain schemas.GenerateChunk
	if !parseChunkLine(lines[1], &plain) || plain.Text != " wörld 日本 🙂" || plain.Seq != 17 || plain.Tokens != 18 || plain.RequestID != "j.2" {
		t.Fatalf("plain chunk not taken by the fast path: %+v", plain)
	}
	var esc schemas.GenerateChunk
	if !parseChunkLine(lines[2], &esc) || esc.Text != "a\nb" {
		t.Fatalf("chunk with an escaped newline: %+v", esc)
	}
	if fast < 1000 {
		t.Fatalf("fast path took only %d of %d lines", fast, len(lines))
	}
}
