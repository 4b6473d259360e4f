package gateway

import (
	"crypto/sha256"
	"crypto/subtle"
	"net/http"
	"strings"
)

// tokenSet holds the accepted bearer tokens as digests: comparing fixed-length
// digests in constant time hides both the content and the length of the tokens.
type tokenSet [][sha256.Size]byte

func newTokenSet(tokens []string) tokenSet {
	var ts tokenSet
	for _, t := range tokens {
		if t != "" {
			ts = append(ts, sha256.Sum256([]byte(t)))
		}
	}
	return ts
}

// valid compares against every token without stopping early.
func (ts tokenSet) valid(token string) bool {
	d := sha256.Sum256([]byte(token))
	match := 0
	for i := range ts {
		match |= subtle.ConstantTimeCompare(d[:], ts[i][:])
	}
	return match == 1
}

// requireToken guards next with bearer-token auth when tokens are configured.
func (g *Gateway) requireToken(next http.Handler) http.Handler {
	if len(g.tokens) == 0 {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") {
			writeError(w, errUnauthorized("Missing bearer token: send 'Authorization: Bearer <token>'."))
			return
		}
		if !g.tokens.valid(strings.TrimSpace(token)) {
			writeError(w, errUnauthorized("Incorrect API key provided."))
			return
		}
		next.ServeHTTP(w, r)
	})
}
