package placement

import (
	"strconv"
	"strings"
	"testing"
	"time"
)

// A token checks only for the attempt it was signed for, under the key that
// signed it, while it is young enough.
// Mutations caught: mac leaving out any one field (its row stays valid);
// Verify without the age check, or without the future check; the issue
// time left out of the MAC (a token moved to a later time verifies).
func TestTokenBindsEveryField(t *testing.T) {
	k := KeyFrom("dispatcher", "s3cret")
	a := Attempt{Tenant: "acme", JobID: "j1", Model: "tiny", WorkerID: "mac-1", Attempt: 2}
	now := time.Unix(1_800_000_000, 0)
	const maxAge = time.Hour
	tok := k.Sign(a, now)
	at, sum, _ := strings.Cut(tok, ".")
	if at != "1800000000" || len(sum) != 64 {
		t.Fatalf("token %q: want the issue time, a dot and 64 hex digits", tok)
	}
	if !k.Verify(tok, a, now.Add(maxAge-time.Second), maxAge) {
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
		if k.Verify(tok, b, now, maxAge) {
			t.Errorf("token of %+v verifies for another %s: %+v", a, name, b)
		}
	}
	for _, other := range []Key{KeyFrom("dispatcher", "other"), KeyFrom(), {}} {
		if other.Verify(tok, a, now, maxAge) {
			t.Errorf("token verifies under another key")
		}
	}
	later := strconv.FormatInt(now.Unix()+60, 10) + "." + sum
	for name, bad := range map[string]string{
		"empty": "", "no dot": sum, "not hex": at + ".zz", "short": tok[:len(tok)-2], "long": tok + "00",
		"moved to a later issue time": later, "leading zero": "0" + tok, "signed": "+" + tok,
	} {
		if k.Verify(bad, a, now, maxAge) {
			t.Errorf("%s token %q verifies", name, bad)
		}
	}
	if k.Verify(tok, a, now.Add(maxAge+time.Second), maxAge) {
		t.Error("a token older than maxAge verifies")
	}
	if k.Verify(tok, a, now.Add(-ClockSkew-time.Second), maxAge) {
		t.Error("a token issued past the clock skew in the future verifies")
	}
	if !k.Verify(tok, a, now.Add(-ClockSkew+time.Second), maxAge) {
		t.Error("a token issued within the clock skew in the future does not verify")
	}
	if Off().Sign(a, now) != "" || Off().Verify(tok, a, now, maxAge) || Off().Verify(Off().Sign(a, now), a, now, maxAge) {
		t.Error("Off signs or checks a token")
	}
	if (Key{}).Sign(a, now) != KeyFrom().Sign(a, now) {
		t.Error("the zero Key is not KeyFrom()")
	}
	if KeyFrom("ab", "c").Sign(a, now) == KeyFrom("a", "bc").Sign(a, now) {
		t.Error("secrets split differently give one key")
	}
}
