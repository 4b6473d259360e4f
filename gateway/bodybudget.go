package gateway

import (
	"io"
	"sync"
)

// bodyShares: one tenant's request bodies may hold at most 1/bodyShares of the
// gateway's body budget at once (but at least one body's limit, or a body of
// that size could never be read). A fixed fraction rather than budget ÷ active
// tenants: a share that grows while a tenant is alone lets it fill the whole
// budget, and a tenant arriving later cannot take back bytes already held, so it
// would find the budget full until those bodies end (30 s each, and the holder
// can send again) — the starvation the share is there to prevent. With a quarter,
// three quarters are always out of any one tenant's reach; the price is that a
// tenant alone reads at most a quarter (8 MiB of the default 32: two bodies at
// the 3 MiB limit, or thousands of ordinary ones) at once. Only several tenants
// together (one credential is one tenant) can fill the budget.
const bodyShares = 4

// minBodyGrowth is the first allocation of a body's buffer once its first byte
// arrived (or the body's length, if smaller); it doubles from there.
const minBodyGrowth = 512

// bodyBudget counts the bytes of request bodies held in memory: all tenants'
// within capacity, each tenant's within share. Bytes are charged as a body's
// buffer grows, which it does only once bytes arrive (readCharged), so a
// connection that declares a length and sends nothing holds nothing. It never
// waits: a charge that does not fit is refused, so a flood cannot queue
// goroutines either.
type bodyBudget struct {
	capacity int64
	share    int64

	mu      sync.Mutex
	used    int64
	held    map[string]int64 // by tenant; a tenant holding nothing is absent
	changed chan struct{}    // tests: a token after each change; nil: nobody asks
}

// newBodyBudget bounds bodies to capacity bytes together, raised to maxBody if
// below it (a body of that size could never be read otherwise).
func newBodyBudget(capacity, maxBody int64) *bodyBudget {
	capacity = max(capacity, maxBody)
	return &bodyBudget{capacity: capacity, share: max(capacity/bodyShares, maxBody), held: map[string]int64{}}
}

// bodyRefusal says why bytes did not fit; zero: they did.
type bodyRefusal int

const (
	bodyFits       bodyRefusal = iota
	bodyBudgetFull             // all tenants together are at the capacity
	bodyShareFull              // this tenant is at its share
)

// refusal says whether n more bytes of tenant fit now. b.mu is held.
func (b *bodyBudget) refusal(tenant string, n int64) bodyRefusal {
	switch {
	case b.held[tenant]+n > b.share:
		return bodyShareFull
	case b.used+n > b.capacity:
		return bodyBudgetFull
	}
	return bodyFits
}

// fits says whether n bytes of tenant would fit now, charging nothing: a body
// whose declared length cannot fit is refused before it is read.
func (b *bodyBudget) fits(tenant string, n int64) bodyRefusal {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.refusal(tenant, n)
}

// charge adds n bytes to tenant's account if they fit.
func (b *bodyBudget) charge(tenant string, n int64) bodyRefusal {
	b.mu.Lock()
	defer b.mu.Unlock()
	if r := b.refusal(tenant, n); r != bodyFits {
		return r
	}
	b.used += n
	b.held[tenant] += n
	b.notify()
	return bodyFits
}

// refund gives back n bytes tenant was charged.
func (b *bodyBudget) refund(tenant string, n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.used -= n
	if b.held[tenant] -= n; b.held[tenant] == 0 {
		delete(b.held, tenant) // tenants come and go: the map does not keep them
	}
	b.notify()
}

// notify tells a watching test that the accounts changed. b.mu is held.
func (b *bodyBudget) notify() {
	select {
	case b.changed <- struct{}{}:
	default: // a token is already waiting, or nobody watches (nil)
	}
}

// bodyHold is what one request's body holds of the budget.
type bodyHold struct {
	budget *bodyBudget
	tenant string
	n      int64
}

// grow charges n more bytes to the hold.
func (h *bodyHold) grow(n int64) bodyRefusal {
	r := h.budget.charge(h.tenant, n)
	if r == bodyFits {
		h.n += n
	}
	return r
}

// release gives back everything held; calling it again does nothing. Not safe
// for concurrent use: one request's goroutine owns its hold.
func (h *bodyHold) release() {
	h.budget.refund(h.tenant, h.n)
	h.n = 0
}

// errBodyBudget ends readCharged when the buffer's growth did not fit.
type errBodyBudget struct{ why bodyRefusal }

func (e errBodyBudget) Error() string { return "request body budget exhausted" }

// readCharged reads r to its end into a buffer whose capacity is charged to hold
// before it is allocated. The buffer grows only after a one-byte read proves
// another byte has arrived: a client that sends nothing holds nothing (the
// probe is one byte), and one that sends holds at most twice what it sent
// (doubling; at least minBodyGrowth) and never more than bound, the body's
// declared length or limit. Nothing is allocated by the declared length up
// front: that would be memory the budget does not see, one body's worth per
// idle connection. Between a growth and the next garbage collection the old,
// smaller buffer is garbage the budget no longer counts, as all garbage is
// bounded by the Go heap target rather than here.
func readCharged(r io.Reader, hold *bodyHold, bound int64) ([]byte, error) {
	var buf []byte
	probe := make([]byte, 1)
	for {
		if len(buf) < cap(buf) {
			n, err := r.Read(buf[len(buf):cap(buf)])
			buf = buf[:len(buf)+n]
			if err == io.EOF {
				return buf, nil
			}
			if err != nil {
				return nil, err
			}
			continue
		}
		n, err := r.Read(probe)
		if n > 0 {
			size := min(max(2*int64(cap(buf)), minBodyGrowth), bound)
			size = max(size, int64(len(buf))+1) // bound is never passed, but never lose a byte read
			if why := hold.grow(size - int64(cap(buf))); why != bodyFits {
				return nil, errBodyBudget{why}
			}
			grown := make([]byte, len(buf), size)
			copy(grown, buf)
			buf = append(grown, probe[0])
		}
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return nil, err
		}
	}
}
