package main

import (
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/placement"
)

// The dispatchers' placement key comes from the secret they connect with: one
// credential, one key; another secret, another key; no secret on a server
// that requires authentication, no key at all (Off), since the key of no
// secret would let any worker credential end any job.
// Mutations caught: placementKeyFor without the Off branch; KeyFrom without
// the password (another password, the same key).
func TestPlacementKeyFollowsTheSecret(t *testing.T) {
	a := placement.Attempt{Tenant: "t", JobID: "j", Model: "m", WorkerID: "w", Attempt: 1}
	now := time.Now()
	sign := func(k placement.Key) string { return k.Sign(a, now) }
	same := placementKeyFor(true, "dispatcher", "pw", "", "", "")
	if sign(same) == "" || sign(same) != sign(placementKeyFor(true, "dispatcher", "pw", "", "", "")) {
		t.Error("one credential gives two keys")
	}
	for name, k := range map[string]placement.Key{
		"another password": placementKeyFor(true, "dispatcher", "pw2", "", "", ""),
		"a creds file":     placementKeyFor(true, "", "", "", "jwt+seed", ""),
		"a TLS key":        placementKeyFor(true, "", "", "", "", "-----BEGIN KEY-----"),
		"no secret, open":  placementKeyFor(false, "", "", "", "", ""),
	} {
		if k.IsOff() || sign(k) == "" || sign(k) == sign(same) {
			t.Errorf("%s: key off or the same as the credential's", name)
		}
	}
	if !placementKeyFor(true, "", "", "", "", "").IsOff() {
		t.Error("no secret on a server that requires authentication: the key is not Off")
	}
	if placementKeyFor(false, "", "", "", "", "").Verify(sign(placement.KeyFrom()), a, now, time.Hour) != true {
		t.Error("no secret on an open server is not the key of no secret")
	}
}
