package gateway

import (
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"net/http"
	"strings"
)

// tenantAuth maps bearer tokens to tenants. It holds the tokens as digests:
// comparing fixed-length digests in constant time hides both the content and
// the length of the tokens.
type tenantAuth struct {
	digests [][sha256.Size]byte
	tenants []string
}

// newTenantAuth accepts tokens (tenant DefaultTenant) and tokenTenants (each
// token's own tenant); empty tokens are ignored.
func newTenantAuth(tokens []string, tokenTenants map[string]string) (*tenantAuth, error) {
	ta := &tenantAuth{}
	add := func(token, tenant string) error {
		if token == "" {
			return nil
		}
		if !tenantPattern.MatchString(tenant) {
			return fmt.Errorf("gateway: tenant %q must match %s", tenant, tenantPattern)
		}
		ta.digests = append(ta.digests, sha256.Sum256([]byte(token)))
		ta.tenants = append(ta.tenants, tenant)
		return nil
	}
	for _, t := range tokens {
		if err := add(t, DefaultTenant); err != nil {
			return nil, err
		}
	}
	for t, tenant := range tokenTenants {
		if err := add(t, tenant); err != nil {
			return nil, err
		}
	}
	return ta, nil
}

// count is the number of distinct tenants the tokens name.
func (ta *tenantAuth) count() int {
	seen := map[string]bool{}
	for _, t := range ta.tenants {
		seen[t] = true
	}
	return len(seen)
}

// enabled: tokens are configured, so /v1 needs one.
func (ta *tenantAuth) enabled() bool { return len(ta.digests) > 0 }

// tenant returns the tenant of token, looking at every token without stopping early.
func (ta *tenantAuth) tenant(token string) (string, bool) {
	d := sha256.Sum256([]byte(token))
	found := -1
	for i := range ta.digests {
		if subtle.ConstantTimeCompare(d[:], ta.digests[i][:]) == 1 {
			found = i
		}
	}
	if found < 0 {
		return "", false
	}
	return ta.tenants[found], true
}

// authenticate is the gateway's one bearer-token check: the tenant r's
// "Authorization: Bearer <token>" names, DefaultTenant when no tokens are
// configured, or the 401 to answer with.
func (ta *tenantAuth) authenticate(r *http.Request) (string, *apiError) {
	if !ta.enabled() {
		return DefaultTenant, nil
	}
	scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", errUnauthorized("Missing bearer token: send 'Authorization: Bearer <token>'.")
	}
	tenant, ok := ta.tenant(strings.TrimSpace(token))
	if !ok {
		return "", errUnauthorized("Incorrect API key provided.")
	}
	return tenant, nil
}

// requireToken guards next with the bearer-token check (for /v1 paths that are
// no endpoint: they answer 404 only to a caller with a token).
func (g *Gateway) requireToken(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, aerr := g.tenants.authenticate(r); aerr != nil {
			writeError(w, aerr)
			return
		}
		next.ServeHTTP(w, r)
	})
}
