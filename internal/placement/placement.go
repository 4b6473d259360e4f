// Package placement owns the proof that a dispatcher placed one attempt of a
// job on one worker: a token the placing dispatcher signs into the assignment
// (schemas.AssignedJob.Placement) and any dispatcher holding the same key can
// check.
//
// Why: a worker hands a job's terminal record to the dispatcher that placed
// the job (subjects.Done), which alone knows the attempt is that worker's.
// When that dispatcher is gone (killed, or stopped while the store refused
// its writes), nobody took the record: the JOBS message came back after its
// ack wait and the job ran again from the start — a finished generation
// thrown away, and with max_attempts 1 a job that had completed ended
// attempts_exhausted. With the token, the worker offers the record to any
// dispatcher instead (subjects.Adopt), and one that can check the token
// stores it (dispatcher/adopt.go); the JOBS redelivery then finds the record
// and is acked without running. Without the token a worker credential could
// end any job whose id it knows with a record of its choosing.
//
// The key is derived from the secret the dispatchers connect with
// (cmd/mlx-serving): every dispatcher of `auth init` shares one credential,
// so they share the key, and no worker, gateway or producer knows it. Without
// authentication the key is derived from nothing and anyone can forge a
// token — as anyone can then write RESULTS directly. Dispatchers that connect
// with different secrets cannot check one another's tokens: a record of a
// dispatcher that is gone is then not adopted, and its job runs again, as it
// did before adoption.
package placement

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"strconv"
	"strings"
	"time"
)

// Key signs and checks placements. The zero Key is the key derived from no
// secret at all (KeyFrom()); Off signs nothing and checks nothing.
type Key struct {
	k   []byte
	off bool
}

// Off is the key of a dispatcher that adopts nothing: it signs no placement
// (Sign returns "") and no token checks. For a dispatcher with no secret to
// derive a key from on a server that requires authentication (TLS client
// certificates alone): the key of no secret would let any worker credential
// end any job.
func Off() Key { return Key{off: true} }

// IsOff reports whether k is Off.
func (k Key) IsOff() bool { return k.off }

// KeyFrom derives the key from the secrets a dispatcher authenticates with
// (user, password, token, the contents of a creds or nkey seed file). Each
// part is length-prefixed, so no two lists of secrets give one key.
func KeyFrom(secrets ...string) Key {
	h := sha256.New()
	h.Write([]byte("mlx-serving placement key v1"))
	for _, s := range secrets {
		h.Write(strconv.AppendInt(nil, int64(len(s)), 10))
		h.Write([]byte{':'})
		h.Write([]byte(s))
	}
	return Key{k: h.Sum(nil)}
}

// Attempt is what a placement vouches for: one attempt of one job of a
// tenant, for one model, on one worker (and, in the token, since when).
type Attempt struct {
	Tenant, JobID, Model, WorkerID string
	Attempt                        int
}

// Sign is the token of a, issued at issued: the issue time in Unix seconds,
// a dot, and 64 lowercase hex digits. The time is signed too: a token is
// good only for as long as its attempt can run (Verify's maxAge), so a
// worker cannot keep one and end the job with it later — after a replay
// purged its record, say.
func (k Key) Sign(a Attempt, issued time.Time) string {
	if k.off {
		return ""
	}
	at := strconv.FormatInt(issued.Unix(), 10)
	return at + "." + hex.EncodeToString(k.mac(a, at))
}

// ClockSkew is how far in the future of the checking dispatcher's clock a
// token's issue time may lie (another dispatcher's clock signed it).
const ClockSkew = 5 * time.Minute

// Verify reports whether token is k's token of a, issued at most maxAge
// before now (and at most ClockSkew after it).
func (k Key) Verify(token string, a Attempt, now time.Time, maxAge time.Duration) bool {
	at, sum, ok := strings.Cut(token, ".")
	if !ok || k.off {
		return false
	}
	secs, err := strconv.ParseInt(at, 10, 64)
	if err != nil || at != strconv.FormatInt(secs, 10) {
		return false
	}
	issued := time.Unix(secs, 0)
	if now.Sub(issued) > maxAge || issued.Sub(now) > ClockSkew {
		return false
	}
	got, err := hex.DecodeString(sum)
	return err == nil && hmac.Equal(got, k.mac(a, at))
}

func (k Key) mac(a Attempt, issued string) []byte {
	key := k.k
	if key == nil {
		key = KeyFrom().k
	}
	m := hmac.New(sha256.New, key)
	// Length-prefixed, so no field's bytes can pass for another's.
	for _, f := range []string{a.Tenant, a.JobID, a.Model, a.WorkerID, strconv.Itoa(a.Attempt), issued} {
		m.Write(strconv.AppendInt(nil, int64(len(f)), 10))
		m.Write([]byte{':'})
		m.Write([]byte(f))
	}
	return m.Sum(nil)
}
