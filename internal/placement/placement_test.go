package placement

import "testing"

// A token checks only for the attempt it was signed for, under the key that
// signed it.
// Mutations caught: mac leaving out any one field (its row stays valid);
// Verify returning true for a decodable token.
func TestTokenBindsEveryField(t *testing.T) {
	k := KeyFrom("dispatcher", "s3cret")
	a := Attempt{Tenant: "acme", JobID: "j1", Model: "tiny", WorkerID: "mac-1", Attempt: 2}
	tok := k.Sign(a)
	if len(tok) != 64 {
		t.Fatalf("token %q: want 64 hex digits", tok)
	}
	if !k.Verify(tok, a) {
		t.Fatal("a token does not verify for its own attempt")
	}
	for name, b := range map[string]Attempt{
		"tenant":  {Tenant: "acme2", JobID: "j1", Model: "tiny", WorkerID: "mac-1", Attempt: 2},
		"job":     {Tenant: "acme", JobID: "j2", Model: "tiny", WorkerID: "mac-1", Attempt: 2},
		"model":   {Tenant: "acme", JobID: "j1", Model: "big", WorkerID: "mac-1", Attempt: 2},
		"worker":  {Tenant: "acme", JobID: "j1", Model: "tiny", WorkerID: "mac-2", Attempt: 2},
		"attempt": {Tenant: "acme", JobID: "j1", Model: "tiny", WorkerID: "mac-1", Attempt: 3},
		// Field boundaries: the same bytes split differently.
		"boundary": {Tenant: "acmej", JobID: "1", Model: "tiny", WorkerID: "mac-1", Attempt: 2},
	} {
		if k.Verify(tok, b) {
			t.Errorf("token of %+v verifies for another %s: %+v", a, name, b)
		}
	}
	for _, other := range []Key{KeyFrom("dispatcher", "other"), KeyFrom(), {}} {
		if other.Verify(tok, a) {
			t.Errorf("token verifies under another key")
		}
	}
	for _, bad := range []string{"", "zz", tok[:62], tok + "00"} {
		if k.Verify(bad, a) {
			t.Errorf("token %q verifies", bad)
		}
	}
	if (Key{}).Sign(a) != KeyFrom().Sign(a) {
		t.Error("the zero Key is not KeyFrom()")
	}
	if KeyFrom("ab", "c").Sign(a) == KeyFrom("a", "bc").Sign(a) {
		t.Error("secrets split differently give one key")
	}
}
