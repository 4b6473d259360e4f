package bus

import "sync"

// minted remembers the job ids this process made (NewJobID, or Submit filling
// an empty id) until they are submitted. Submit's RESULTS check exists to
// refuse a finished job's id submitted again; an id made here a moment ago
// cannot have a record (80 random bits), so its check is skipped: one request
// less per job for the server, and one round trip less before the publish
// (it overlapped the job's validation, so a Submit gains less than a round
// trip: BenchmarkSubmitID). The gateway mints every id, as do Submit and
// SubmitStream for a job without one. An id the caller chose, or one
// submitted a second time, is checked as before.
//
// Nothing rests on it for correctness: a job whose record exists is acked
// without running by the dispatcher whatever the producer checked. Ids made
// but never submitted are forgotten when the set reaches mintedMax (the set
// is then cleared: those ids would only be checked again).
var minted = mintedIDs{ids: map[string]struct{}{}}

// mintedMax bounds the ids kept (~40 bytes each).
const mintedMax = 1 << 16

type mintedIDs struct {
	mu  sync.Mutex
	ids map[string]struct{}
}

// add notes id as made by this process.
func (m *mintedIDs) add(id string) string {
	m.mu.Lock()
	if len(m.ids) >= mintedMax {
		clear(m.ids)
	}
	m.ids[id] = struct{}{}
	m.mu.Unlock()
	return id
}

// take reports whether id was made here and not taken yet, and forgets it.
func (m *mintedIDs) take(id string) bool {
	m.mu.Lock()
	_, ok := m.ids[id]
	if ok {
		delete(m.ids, id)
	}
	m.mu.Unlock()
	return ok
}
