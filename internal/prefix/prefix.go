// Package prefix is the one definition of a job's prompt prefix identity, shared
// by the worker (which advertises the prefixes it ran in its heartbeat) and the
// dispatcher (which routes a job to the worker that holds the longest one).
//
// # Identity
//
// A job's prompt is first written as canonical text, independent of any
// tokenizer. It starts with a header and the job's tenant as <len>:<tenant>
// (the default tenant's token for none): the runtime reuses prompt-cache
// entries only within a tenant (its cache_scope), so two tenants' identical
// prompts share nothing and must not look alike to routing either. Then:
//
//   - a completion job (prompt): header "mlx-prefix/3 text\n"; the prompt
//     bytes as they are;
//   - a chat job (messages): header "mlx-prefix/4 chat\n"; the job's tools as
//     <len>:<JSON of tools> (0: for none; the chat template renders them before
//     the conversation), then every message in order as
//     <len(role)>:<role><len(content)>:<content><len(calls)>:<calls>, where
//     calls is the JSON of the message's tool_call_id and tool_calls, empty when
//     it has neither (lengths in bytes, decimal). The length prefixes make the
//     encoding unambiguous whatever the content holds, and the encoding of
//     messages[:k] is a byte prefix of the encoding of messages, so a
//     conversation's next turn extends its last one. Nothing else a job carries
//     is rendered into the prompt (tool_choice and json_schema constrain
//     decoding); a field that becomes rendered must be added here, and the
//     version in the header raised.
//
// The canonical text is cut into blocks of BlockSize bytes, the last one
// possibly shorter, and hashed as a chain: h_0 = H(0^8 || block_0),
// h_i = H(h_{i-1} || block_i), where H is the first 8 bytes of SHA-256. h_i
// therefore names the whole text up to the end of block i, not just block i:
// two jobs share h_i exactly when their canonical texts agree on the first i+1
// blocks (up to hash collisions, 2^-64 per pair). Only the first MaxBlocks
// blocks (64 KiB) are hashed: longer prompts match at most that far.
//
// A Hash is written as 16 lower-case hex digits on the bus.
//
// # Across workers
//
// Workers that announce the same model name load the same model, so the same
// tokenizer and chat template: a canonical text they agree on renders to the same
// tokens on each. The identity is computed from the job alone, so a worker
// hashing what it ran and a dispatcher hashing what it is about to place get the
// same chain without sharing anything but this package.
//
// # Why it approximates the runtime's cache
//
// The runtime keeps finished requests' KV caches (prompt tokens and the tokens
// generated after them) and reuses the longest cached token prefix of a new
// request. When two jobs' canonical texts share their first k full blocks, their
// rendered prompts share the tokens of those k*BlockSize bytes of messages (the
// template wraps the same messages in the same order the same way), up to the
// token that straddles the first difference. The chain therefore measures the
// reusable prefix in blocks of about 64 tokens. It is an approximation: a worker
// only knows what it ran, not what its runtime's LRU has since evicted (the
// worker bounds its summary by the runtime's entry count for that reason), and a
// chat template that rewrites earlier turns (e.g. drops reasoning) makes the
// token prefix shorter than the text prefix.
//
// A finished job's reply extends the cached tokens. AfterReply is the chain of
// the job's prompt followed by its reply: the assistant message for a chat job
// (the prefix of the conversation's next turn), the appended text for a
// completion job. A worker advertises both chains.
package prefix

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"strconv"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// BlockSize is the bytes of canonical text one hash covers: about 64 tokens of
// English text, fine enough to see a shared system prompt, coarse enough that a
// 16 KiB conversation is 64 hashes.
const BlockSize = 256

// MaxBlocks bounds a chain: 64 KiB of canonical text. Beyond it prompts are
// not told apart, which costs routing nothing (they share 64 KiB already).
const MaxBlocks = 256

// Hash names a canonical text up to the end of one block.
type Hash uint64

// String is the bus form: 16 lower-case hex digits.
func (h Hash) String() string {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(h))
	return hex.EncodeToString(b[:])
}

// ErrSyntax is returned by Parse for anything but 16 lower-case hex digits.
var ErrSyntax = errors.New("prefix: hash must be 16 lower-case hex digits")

// Parse reads the bus form of a Hash.
func Parse(s string) (Hash, error) {
	if len(s) != 16 {
		return 0, ErrSyntax
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return 0, ErrSyntax
		}
	}
	n, err := strconv.ParseUint(s, 16, 64)
	if err != nil {
		return 0, ErrSyntax
	}
	return Hash(n), nil
}

// Chain hashes canonical text block by block (see the package doc).
func Chain(text []byte) []Hash {
	n := min((len(text)+BlockSize-1)/BlockSize, MaxBlocks)
	out := make([]Hash, 0, n)
	var prev [8]byte
	h := sha256.New()
	var sum [sha256.Size]byte
	for i := 0; i < n; i++ {
		block := text[i*BlockSize : min((i+1)*BlockSize, len(text))]
		h.Reset()
		h.Write(prev[:])
		h.Write(block)
		h.Sum(sum[:0])
		copy(prev[:], sum[:8])
		out = append(out, Hash(binary.BigEndian.Uint64(prev[:])))
	}
	return out
}

const (
	headerText = "mlx-prefix/3 text\n"
	headerChat = "mlx-prefix/4 chat\n"
)

// Canonical is the canonical text of a job's prompt (see the package doc).
func Canonical(req *schemas.JobRequest) []byte {
	tenant := []byte(subjects.TenantToken(req.Tenant))
	if len(req.Messages) == 0 {
		b := appendField([]byte(headerText), tenant)
		return append(b, req.Prompt...)
	}
	b := appendField([]byte(headerChat), tenant)
	var tools []byte
	if len(req.Tools) > 0 {
		tools, _ = json.Marshal(req.Tools) // map keys sorted: the same tools, the same bytes
	}
	b = appendField(b, tools)
	for _, m := range req.Messages {
		var calls []byte
		if m.ToolCallID != "" || len(m.ToolCalls) > 0 {
			calls, _ = json.Marshal(struct {
				ID    string             `json:"tool_call_id,omitempty"`
				Calls []schemas.ToolCall `json:"tool_calls,omitempty"`
			}{m.ToolCallID, m.ToolCalls})
		}
		b = appendMessage(b, m.Role, m.Content, calls)
	}
	return b
}

func appendMessage(b []byte, role, content string, calls []byte) []byte {
	b = appendField(b, []byte(role))
	b = appendField(b, []byte(content))
	return appendField(b, calls)
}

func appendField(b, v []byte) []byte {
	b = strconv.AppendInt(b, int64(len(v)), 10)
	b = append(b, ':')
	return append(b, v...)
}

// OfJob is the chain of a job's prompt.
func OfJob(req *schemas.JobRequest) []Hash { return Chain(Canonical(req)) }

// AfterReply is the chain of a job's prompt followed by the text it generated:
// for a chat job the canonical text with the reply as one more message of role
// assistant, for a completion job the prompt with the text appended.
func AfterReply(req *schemas.JobRequest, reply string) []Hash {
	b := Canonical(req)
	if len(req.Messages) == 0 {
		return Chain(append(b, reply...))
	}
	return Chain(appendMessage(b, "assistant", reply, nil))
}

// Set is the prefixes one worker advertised for one model.
type Set map[Hash]struct{}

// Match is how many leading blocks of chain the set holds: i+1 for the deepest
// chain[i] in it, 0 when none. A chain hash stands for its whole prefix, so the
// deepest hit is the match even when a shallower hash was left out.
func (s Set) Match(chain []Hash) int {
	if len(s) == 0 {
		return 0
	}
	for i := len(chain) - 1; i >= 0; i-- {
		if _, ok := s[chain[i]]; ok {
			return i + 1
		}
	}
	return 0
}
