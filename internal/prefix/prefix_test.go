package prefix

import (
	"bytes"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

func chat(msgs ...string) *schemas.JobRequest {
	r := &schemas.JobRequest{Model: "m"}
	for i := 0; i+1 < len(msgs); i += 2 {
		r.Messages = append(r.Messages, schemas.Message{Role: msgs[i], Content: msgs[i+1]})
	}
	return r
}

// TestChainPinned pins the format: a change of block size, hash, seed or
// encoding changes these, and then workers and dispatchers of different
// versions would stop agreeing (raise the header's version with it). The
// values were computed independently: sha256(8 zero bytes + block)[:8].
// Mutation caught: h.Write(prev[:]) removed (no chaining) turns the second
// hash of a 2-block text into the hash of its second block alone.
func withTools(j *schemas.JobRequest, names ...string) *schemas.JobRequest {
	for _, n := range names {
		j.Tools = append(j.Tools, schemas.Tool{Type: "function", Function: schemas.ToolFunction{Name: n,
			Parameters: map[string]any{"type": "object", "properties": map[string]any{"q": map[string]any{"type": "string"}}}}})
	}
	return j
}

func toolResult(j *schemas.JobRequest, id, content string) *schemas.JobRequest {
	j.Messages = append(j.Messages, schemas.Message{Role: "tool", Content: content, ToolCallID: id})
	return j
}

func TestChainPinned(t *testing.T) {
	t.Parallel()
	got := Chain([]byte(strings.Repeat("a", BlockSize+1)))
	if len(got) != 2 {
		t.Fatalf("chain of %d bytes has %d hashes, want 2", BlockSize+1, len(got))
	}
	want := []string{"913709c6efa32c1e", "e4fab280446f5da5"}
	for i := range got {
		if got[i].String() != want[i] {
			t.Errorf("h_%d = %s, want %s", i, got[i], want[i])
		}
	}
	if alone := Chain([]byte("a"))[0]; alone == got[1] {
		t.Error("the second hash does not depend on the first block")
	}
}

func TestCanonicalTable(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("You are a helpful assistant. ", 40) // > 4 blocks
	tests := []struct {
		name      string
		a, b      *schemas.JobRequest
		wantMatch func(na, nb, m int) bool // m: blocks of b that a's set holds
	}{
		{"same chat job: whole chain", chat("system", long, "user", "hi"), chat("system", long, "user", "hi"),
			func(na, nb, m int) bool { return m == nb && na == nb }},
		{"shared system prompt: its full blocks", chat("system", long, "user", "hi"), chat("system", long, "user", "bye"),
			func(na, nb, m int) bool { return m >= len(long)/BlockSize && m < nb }},
		{"next turn extends the last", chat("system", long, "user", "hi"), chat("system", long, "user", "hi", "assistant", "hello", "user", "more"),
			func(na, nb, m int) bool { return m >= na-1 && m < nb }},
		{"role is part of identity", chat("system", long), chat("user", long),
			func(na, nb, m int) bool { return m == 0 }},
		{"chat and prompt of the same text differ", chat("user", long), &schemas.JobRequest{Prompt: "4:user" + long},
			func(na, nb, m int) bool { return m == 0 }},
		{"completion prompt extended", &schemas.JobRequest{Prompt: long}, &schemas.JobRequest{Prompt: long + " and more"},
			func(na, nb, m int) bool { return m == na-1 }},
		{"moved boundary between messages differs", chat("user", "ab", "user", "c"), chat("user", "a", "user", "bc"),
			func(na, nb, m int) bool { return m == 0 }},
		{"tools are rendered first: other tools, no shared prefix", withTools(chat("system", long), "lookup"), withTools(chat("system", long), "search"),
			func(na, nb, m int) bool { return m == 0 }},
		{"same tools: shared prefix", withTools(chat("system", long, "user", "a"), "lookup"), withTools(chat("system", long, "user", "b"), "lookup"),
			func(na, nb, m int) bool { return m >= len(long)/BlockSize && m < nb }},
		{"a tool result differs from user text", toolResult(chat("system", long), "call_1", "42"), chat("system", long, "tool", "42"),
			func(na, nb, m int) bool { return m < nb }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a, b := OfJob(tc.a), OfJob(tc.b)
			set := Set{}
			for _, h := range a {
				set[h] = struct{}{}
			}
			if m := set.Match(b); !tc.wantMatch(len(a), len(b), m) {
				t.Errorf("match %d (chain lengths %d, %d)", m, len(a), len(b))
			}
		})
	}
}

// TestAfterReplyIsNextTurnPrefix: the chain a worker advertises after a chat
// job ran covers every full block of the conversation's next turn up to the
// reply. Mutation caught: AfterReply appending the reply without its
// assistant framing matches only the prompt's blocks.
func TestAfterReplyIsNextTurnPrefix(t *testing.T) {
	t.Parallel()
	sys := strings.Repeat("s", 300)
	reply := strings.Repeat("r", 700)
	first := chat("system", sys, "user", "question")
	next := chat("system", sys, "user", "question", "assistant", reply, "user", "follow-up")
	adv := AfterReply(first, reply)
	set := Set{}
	for _, h := range adv {
		set[h] = struct{}{}
	}
	prompt := OfJob(first)
	m := set.Match(OfJob(next))
	if m < len(adv)-1 || m <= len(prompt) {
		t.Fatalf("next turn matches %d blocks of the advertised %d (the prompt alone is %d)", m, len(adv), len(prompt))
	}
	comp := &schemas.JobRequest{Prompt: sys}
	tenant := strconv.Itoa(len(subjects.DefaultTenant)) + ":" + subjects.DefaultTenant
	if got, want := AfterReply(comp, reply), Chain(append([]byte(headerText+tenant+sys), reply...)); !slices.Equal(got, want) {
		t.Fatal("completion AfterReply is not the prompt with the text appended")
	}
}

func TestMaxBlocks(t *testing.T) {
	t.Parallel()
	if n := len(Chain(make([]byte, (MaxBlocks+3)*BlockSize))); n != MaxBlocks {
		t.Fatalf("chain of a long text has %d hashes, want %d", n, MaxBlocks)
	}
	if n := len(Chain(nil)); n != 0 {
		t.Fatalf("empty text has %d hashes", n)
	}
}

func TestParse(t *testing.T) {
	t.Parallel()
	for _, h := range []Hash{0, 1, 0xdeadbeefcafef00d, ^Hash(0)} {
		got, err := Parse(h.String())
		if err != nil || got != h {
			t.Errorf("Parse(%s) = %v, %v", h, got, err)
		}
	}
	for _, bad := range []string{"", "0123", "0123456789ABCDEF", "0123456789abcdeg", "+123456789abcdef", "0123456789abcdef0"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
}

// FuzzChain: h_i of two texts agree exactly when the texts agree up to the end
// of block i (same bytes, same length).
func FuzzChain(f *testing.F) {
	f.Add([]byte(strings.Repeat("x", 300)), []byte(strings.Repeat("x", 600)))
	f.Add([]byte("abc"), []byte("abd"))
	f.Fuzz(func(t *testing.T, a, b []byte) {
		ca, cb := Chain(a), Chain(b)
		for i := range min(len(ca), len(cb)) {
			ea, eb := min((i+1)*BlockSize, len(a)), min((i+1)*BlockSize, len(b))
			same := ea == eb && bytes.Equal(a[:ea], b[:eb])
			if (ca[i] == cb[i]) != same {
				t.Fatalf("block %d: hashes equal %v, prefixes equal %v", i, ca[i] == cb[i], same)
			}
		}
	})
}

// FuzzCanonicalInjective: two different message lists never share a canonical
// text, whatever their roles and contents hold. Mutation caught (by the first
// seed, in every plain test run): the content's length prefix left out.
func FuzzCanonicalInjective(f *testing.F) {
	f.Add("a", "1:b:X", "c", "d", "a", "", "b", "X1:c:d")
	f.Add("user", "a:b", "user", "c", "user", "a", "user:b", "c")
	f.Add("4:us", "er", "", "", "4:user", "", "", "")
	f.Fuzz(func(t *testing.T, r1, c1, r2, c2, s1, d1, s2, d2 string) {
		a := chat(r1, c1, r2, c2)
		b := chat(s1, d1, s2, d2)
		same := slices.EqualFunc(a.Messages, b.Messages, func(x, y schemas.Message) bool { return x.Role == y.Role && x.Content == y.Content })
		if bytes.Equal(Canonical(a), Canonical(b)) != same {
			t.Fatalf("canonical equality disagrees with message equality: %q vs %q", a.Messages, b.Messages)
		}
	})
}

// Two tenants' identical prompts share no prefix: the runtime's prompt cache
// is scoped by tenant (cache_scope), so routing one tenant's job to the worker
// holding another's prefix would gain nothing, and the chains must say so;
// one tenant's jobs still match each other. Mutation caught: Canonical
// without the tenant field (the chains are equal).
func TestTenantsShareNoPrefix(t *testing.T) {
	t.Parallel()
	sys := strings.Repeat("s", 3*BlockSize)
	for _, mk := range []func(tenant string) *schemas.JobRequest{
		func(tenant string) *schemas.JobRequest { return &schemas.JobRequest{Tenant: tenant, Prompt: sys} },
		func(tenant string) *schemas.JobRequest {
			j := chat("system", sys, "user", "q")
			j.Tenant = tenant
			return j
		},
	} {
		a, b, a2 := OfJob(mk("a")), OfJob(mk("b")), OfJob(mk("a"))
		set := Set{}
		for _, h := range a {
			set[h] = struct{}{}
		}
		if n := set.Match(b); n != 0 {
			t.Fatalf("tenant b's prompt matches %d blocks of tenant a's identical one", n)
		}
		if n := set.Match(a2); n != len(a) {
			t.Fatalf("tenant a's prompt matches %d of %d blocks of its own", n, len(a))
		}
	}
}
