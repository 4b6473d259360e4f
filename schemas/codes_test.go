package schemas

import (
	"encoding/json"
	"go/ast"
	"go/parser"
	"go/token"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// TestCodesMatchFile keeps the Go constants of codes.go equal to codes/errors.json:
// a code added to one and not the other fails here (the Python side reads the file
// itself, and python/tests/test_codes.py checks what it raises is listed).
func TestCodesMatchFile(t *testing.T) {
	t.Parallel()
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "codes.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	consts := map[string]string{} // value -> name
	for _, d := range f.Decls {
		g, ok := d.(*ast.GenDecl)
		if !ok || g.Tok != token.CONST {
			continue
		}
		for _, s := range g.Specs {
			vs := s.(*ast.ValueSpec)
			for i, n := range vs.Names {
				lit, ok := vs.Values[i].(*ast.BasicLit)
				if !strings.HasPrefix(n.Name, "Code") || !ok {
					continue
				}
				v, _ := strconv.Unquote(lit.Value)
				if prev, dup := consts[v]; dup {
					t.Errorf("%s and %s both name %q", prev, n.Name, v)
				}
				consts[v] = n.Name
			}
		}
	}
	for v, name := range consts {
		if _, ok := LookupCode(v); !ok {
			t.Errorf("%s = %q is not in codes/errors.json", name, v)
		}
	}
	for _, c := range Codes() {
		if _, ok := consts[c.Code]; !ok {
			t.Errorf("codes/errors.json lists %q but codes.go has no constant for it", c.Code)
		}
	}
}

func TestCodesWellFormed(t *testing.T) {
	t.Parallel()
	// The same pattern result.json puts on error.code.
	pat := regexp.MustCompile(`^[a-z_]{1,64}$`)
	senders := map[string]bool{"runtime": true, "worker": true, "dispatcher": true}
	for _, c := range Codes() {
		if !pat.MatchString(c.Code) {
			t.Errorf("%q does not match %s", c.Code, pat)
		}
		if c.Meaning == "" || len(c.Senders) == 0 {
			t.Errorf("%q has no meaning or no senders", c.Code)
		}
		for _, s := range c.Senders {
			if !senders[s] {
				t.Errorf("%q: unknown sender %q", c.Code, s)
			}
		}
		// A number without data.code must decode to a code of that number.
		if c.RPC != 0 {
			got, _ := LookupCode((&RPCError{Code: c.RPC}).StableCode())
			if got.RPC != c.RPC {
				t.Errorf("%q has rpc %d, but that number decodes to %q", c.Code, c.RPC, got.Code)
			}
		}
	}
	for _, ty := range []Type{Job, Cancel, Heartbeat, "runtime.generate.params"} {
		if _, ok := LookupCode(Code(ty)); !ok {
			t.Errorf("Code(%s) = %q is not listed", ty, Code(ty))
		}
	}
	if !Retryable(CodeOutOfMemory) || Retryable(CodeInvalidRequest) || Retryable("no_such_code") {
		t.Error("Retryable disagrees with codes/errors.json")
	}
}

// TestRuntimeResponseListsEveryRuntimeCode keeps runtime.response.json's error
// enums equal to the codes errors.json says the runtime sends: a code added to
// the file (runtime_busy was) but not to the schema made every such answer a
// contract violation for whoever validates the pipe (python/tests' harness did,
// and CI failed on it).
func TestRuntimeResponseListsEveryRuntimeCode(t *testing.T) {
	t.Parallel()
	raw, err := Raw(RuntimeResponse)
	if err != nil {
		t.Fatal(err)
	}
	var s struct {
		Properties struct {
			Error struct {
				Properties struct {
					Code struct {
						Enum []int `json:"enum"`
					} `json:"code"`
					Data struct {
						Properties struct {
							Code struct {
								Enum []string `json:"enum"`
							} `json:"code"`
						} `json:"properties"`
					} `json:"data"`
				} `json:"properties"`
			} `json:"error"`
		} `json:"properties"`
	}
	if err := json.Unmarshal(raw, &s); err != nil {
		t.Fatal(err)
	}
	wantNums, wantCodes := map[int]bool{}, map[string]bool{}
	for _, c := range Codes() {
		if slices.Contains(c.Senders, "runtime") {
			wantNums[c.RPC], wantCodes[c.Code] = true, true
		}
	}
	gotNums, gotCodes := map[int]bool{}, map[string]bool{}
	for _, n := range s.Properties.Error.Properties.Code.Enum {
		gotNums[n] = true
	}
	for _, c := range s.Properties.Error.Properties.Data.Properties.Code.Enum {
		gotCodes[c] = true
	}
	if !maps.Equal(gotNums, wantNums) {
		t.Errorf("runtime.response error.code enum %v, errors.json's runtime numbers %v", slices.Sorted(maps.Keys(gotNums)), slices.Sorted(maps.Keys(wantNums)))
	}
	if !maps.Equal(gotCodes, wantCodes) {
		t.Errorf("runtime.response error.data.code enum %v, errors.json's runtime codes %v", slices.Sorted(maps.Keys(gotCodes)), slices.Sorted(maps.Keys(wantCodes)))
	}
}
