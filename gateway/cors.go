package gateway

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"
)

// corsPolicy lets pages of the configured origins call the API from a browser.
// With no origins configured it is off: responses carry no CORS header, and a
// browser refuses cross-origin calls as it does by default.
type corsPolicy struct {
	any     bool            // "*": every origin
	origins map[string]bool // serialized origins, "scheme://host[:port]", lower case
}

// corsAlwaysAllowed are the request headers an OpenAI client needs; preflights
// also get the headers they ask for (SDKs add their own, x-stainless-*).
var corsAlwaysAllowed = []string{"Authorization", "Content-Type"}

// newCORS checks the configured origins: "*" or scheme://host[:port], nothing more.
func newCORS(origins []string) (*corsPolicy, error) {
	c := &corsPolicy{origins: map[string]bool{}}
	for _, o := range origins {
		o = strings.TrimSpace(o)
		switch {
		case o == "":
			continue
		case o == "*":
			c.any = true
			continue
		}
		u, err := url.Parse(o)
		if err != nil || u.Scheme == "" || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
			return nil, fmt.Errorf("gateway: CORS origin %q is not \"*\" nor scheme://host[:port]", o)
		}
		c.origins[strings.ToLower(u.Scheme+"://"+u.Host)] = true
	}
	return c, nil
}

func (c *corsPolicy) enabled() bool { return c.any || len(c.origins) > 0 }

func (c *corsPolicy) allows(origin string) bool {
	return c.any || c.origins[strings.ToLower(origin)]
}

// wrap answers preflights from allowed origins itself (before authentication:
// browsers send no credentials on a preflight) and marks every other answer to
// them, errors included, as readable by the page.
func (c *corsPolicy) wrap(next http.Handler) http.Handler {
	if !c.enabled() {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		origin := r.Header.Get("Origin")
		h := w.Header()
		if !c.any {
			h.Add("Vary", "Origin") // the answer depends on the origin
		}
		if origin == "" || !c.allows(origin) {
			next.ServeHTTP(w, r)
			return
		}
		if c.any {
			h.Set("Access-Control-Allow-Origin", "*")
		} else {
			h.Set("Access-Control-Allow-Origin", origin)
		}
		if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
			h.Add("Vary", "Access-Control-Request-Headers")
			h.Set("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
			h.Set("Access-Control-Allow-Headers", allowHeaders(r.Header.Get("Access-Control-Request-Headers")))
			h.Set("Access-Control-Max-Age", "600")
			w.WriteHeader(http.StatusNoContent)
			return
		}
		h.Set("Access-Control-Expose-Headers", "X-Mlx-Job-Id, Retry-After")
		next.ServeHTTP(w, r)
	})
}

// allowHeaders is corsAlwaysAllowed plus the header names a preflight asked for.
func allowHeaders(requested string) string {
	out := append([]string(nil), corsAlwaysAllowed...)
	seen := map[string]bool{}
	for _, name := range out {
		seen[strings.ToLower(name)] = true
	}
	for _, name := range strings.Split(requested, ",") {
		name = strings.TrimSpace(name)
		if name == "" || seen[strings.ToLower(name)] || !isToken(name) {
			continue
		}
		seen[strings.ToLower(name)] = true
		out = append(out, name)
	}
	return strings.Join(out, ", ")
}

// isToken: a header name, so nothing else is echoed into a header.
func isToken(s string) bool {
	for _, r := range s {
		if !(r == '-' || r == '_' || r == '.' || (r >= '0' && r <= '9') || (r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z')) {
			return false
		}
	}
	return len(s) <= 64
}
