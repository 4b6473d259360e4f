package dispatcher

import (
	"context"
	"encoding/json"
	"slices"
	"sync"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Fair intake of the workers' requests that carry a record: hand-overs
// (onDone) and adoption offers (onAdopt).
//
// Each is decoded and schema-checked — up to a max payload — on one of a few
// slots. Before, every request waited on the subscription's goroutine for one
// of 32 slots shared by every worker: one worker credential flooding its own
// done or adopt subject with ~900 KB bodies held them, and every tenant's
// records queued behind it (red team round 18, F1: no record within 20 s in
// 4 of 4 probes). Now:
//   - requests queue per worker, and a freed slot goes to the next worker in
//     turn that has one queued: a flood costs other workers one decode's wait;
//   - the subscription never waits: a request past its worker's cap on what
//     waits is answered busy unread, and the worker tries again; and at most
//     perWorkerTakes of a worker's requests are on slots at once, so a flood
//     decodes no more than that at a time. (The cap first counted what was
//     on slots too: a job's end is counted when its hand-over is taken,
//     before the take leaves its slot, and workers that finish at once —
//     the bench's ceiling — were answered busy by the dozen.)
//     An honest worker gets busy too when its stale copies fill the cap: a
//     dispatcher that did not answer for a while (paused, a frozen path)
//     finds every timed-out try of a hand-over queued, and answered
//     unknown, the live hand-over behind them was dropped and its job ran
//     again (red team round 18, second pass, F1);
//   - adoptions have slots of their own, so they never delay hand-overs.

// Slots and caps. Hand-overs: a worker may have waiting what it may honestly
// have in flight (the jobs this dispatcher has on it: a job ends only when
// its hand-over is taken) and doneQueueSlack more (a retry whose first try
// still waits). Adoptions: an honest worker offers one per job its gone
// dispatcher held on it.
const (
	maxHandOvers    = 32
	maxAdoptions    = 2
	perWorkerTakes  = 2 // a worker's requests on slots at once
	doneQueueSlack  = 2
	adoptQueueLimit = 32
)

// takeQueue runs take on the requests offered, at most slots at once, taking
// workers in turn.
type takeQueue struct {
	d     *Dispatcher
	what  string
	take  func(*nats.Msg) func(context.Context)
	limit func(workerID string) int // how many may wait per worker

	mu     sync.Mutex
	free   int
	queued map[string][]*nats.Msg // by worker id
	taking map[string]int         // by worker id: requests on a slot
	turn   []string               // workers with requests queued, next first
}

func newTakeQueue(d *Dispatcher, what string, slots int, take func(*nats.Msg) func(context.Context), limit func(string) int) *takeQueue {
	return &takeQueue{d: d, what: what, take: take, limit: limit, free: slots, queued: map[string][]*nats.Msg{}, taking: map[string]int{}}
}

// doneLimit: the jobs this dispatcher has on worker wid, and the slack. (A
// worker with none still gets its records read, two at a time: a late
// record is refused as superseded, a forged one counted.)
func (d *Dispatcher) doneLimit(wid string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := doneQueueSlack
	if w := d.workers[wid]; w != nil {
		n += w.mine + w.pending
	}
	return n
}

// offer queues m, a worker's request on its done or adopt subject (checked
// by the caller: sent from an inbox), or answers it busy unread when the
// worker's queue is full. It never waits.
func (q *takeQueue) offer(m *nats.Msg) {
	wid := subjects.WorkerOf(m.Subject)
	limit := q.limit(wid)
	q.mu.Lock()
	if len(q.queued[wid]) >= limit {
		q.mu.Unlock()
		q.d.count().busy()
		q.d.rare.Warn().Str("worker_id", wid).Int("queued", limit).Msg(q.what + " past the worker's queue; answered busy unread")
		if data, err := json.Marshal(schemas.FinishReplyMsg{Status: schemas.FinishBusy}); err == nil {
			_ = m.Respond(data) // answered: see onDone
		}
		return
	}
	if len(q.queued[wid]) == 0 {
		q.turn = append(q.turn, wid)
	}
	q.queued[wid] = append(q.queued[wid], m)
	q.d.writes.Add(1) // a received request is a write to come: shutdown waits for it
	q.startLocked()
	q.mu.Unlock()
}

// startLocked takes queued requests while slots are free, a worker at a time.
func (q *takeQueue) startLocked() {
	for q.free > 0 {
		i := slices.IndexFunc(q.turn, func(w string) bool { return q.taking[w] < perWorkerTakes })
		if i < 0 {
			return // every worker with requests queued has its share on slots
		}
		wid := q.turn[i]
		q.turn = slices.Delete(q.turn, i, i+1)
		ms := q.queued[wid]
		m := ms[0]
		if len(ms) > 1 {
			q.queued[wid] = ms[1:]
			q.turn = append(q.turn, wid)
		} else {
			delete(q.queued, wid)
		}
		q.free--
		q.taking[wid]++
		q.d.warm.Go(func() { q.run(wid, m) })
	}
}

// run takes m on a slot, frees the slot, then runs the write take returned.
func (q *takeQueue) run(wid string, m *nats.Msg) {
	defer q.d.wrote()
	if q.d.handOverHook != nil {
		q.d.handOverHook()
	}
	w := q.take(m)
	// The slot bounds decoding, not writing: a write the store refuses is
	// tried again for as long as the store refuses (writeretry.go), and
	// held slots then stopped every later hand-over — a worker's request
	// timed out, its attempt report retried the job, and the record, handed
	// over at last, was refused as a superseded attempt's: the job ran
	// again. Writes are bounded by the jobs this dispatcher holds (each is
	// handed over once; a refused hand-over makes no write) and by the
	// adoptions offered.
	q.mu.Lock()
	q.free++
	if q.taking[wid]--; q.taking[wid] == 0 {
		delete(q.taking, wid)
	}
	q.startLocked()
	q.mu.Unlock()
	if w != nil {
		// On this goroutine, which is off the subscription's already: a
		// goroutine per record for the write cost a fresh stack grown
		// through the publish path (~2% of the CPU per job).
		q.d.runWrite(w)
	}
}
