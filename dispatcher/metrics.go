package dispatcher

import "sync/atomic"

// Metrics are the dispatcher's own counters, safe to read at any time (tests,
// in-process readers); exporters get the same events through Config.Observer.
// Every field only grows.
type Metrics struct {
	JobsPulled          atomic.Int64 // messages fetched from JOBS (deliveries)
	Batches             atomic.Int64 // assignments accepted by a worker
	JobsAssigned        atomic.Int64 // jobs in accepted assignments (attempts started)
	AssignFull          atomic.Int64 // assignments answered full or rejected
	AssignErrors        atomic.Int64 // assignments that timed out or failed
	Retries             atomic.Int64 // attempts scheduled after a retryable failure
	Completed           atomic.Int64
	Failed              atomic.Int64
	Cancelled           atomic.Int64
	Expired             atomic.Int64
	DeadLettered        atomic.Int64
	AlreadyFinished     atomic.Int64 // deliveries acked because RESULTS already had the job
	WorkersLost         atomic.Int64
	WorkersRestarted    atomic.Int64 // a worker's process changed (new started_at): its jobs were retried
	DeafTicks           atomic.Int64 // ticks that could not have heard workers since the last (hearing.go)
	IllegalTransitions  atomic.Int64
	NotAJob             atomic.Int64 // messages on JOBS that could not be a job: dead-lettered raw and terminated
	StrandedRemoved     atomic.Int64 // JOBS messages left after their ack (a failed delete), whose job has its record: removed
	RecordWriteFailures atomic.Int64 // tries of a terminal record (or its dead letter) the store refused (writeretry.go)
	ForgedRecords       atomic.Int64 // terminal records or attempt reports from a worker that does not run that attempt: refused
	SupersededRecords   atomic.Int64 // terminal records of an attempt the job had moved on from (a late worker): refused, not counted forged
	BadCancels          atomic.Int64 // stored cancels whose subject or body is no cancel: ignored
	BaseClamped         atomic.Int64 // jobs whose metadata asked for an attempt base above what keeps their attempts within the schemas
	DuplicateMsgs       atomic.Int64 // second messages for a job this dispatcher holds (same id, another stream sequence): terminated
	OversizedProgress   atomic.Int64 // progress events larger than any tracked job's could be: dropped unread
	DeadLettersRefused  atomic.Int64 // dead letters the DLQ refused (full, too large): their jobs ended with the record only
	Relayed             atomic.Int64 // messages on workers' subjects without a reply subject: relayed JetStream answers, dropped
	AttemptTimeouts     atomic.Int64 // attempts given up after AttemptTimeout, their jobs retried
	Parked              atomic.Int64 // jobs of a recently served model with no live worker for it, handed back to JOBS for ModelWait
	HandBacksNoted      atomic.Int64 // deliveries handed back with their next attempt noted in the ledger, so they use no attempt
	LedgerWriteFailed   atomic.Int64 // attempt ledger writes that failed: a hand-back counted as an attempt, or a retry handed back
	RecordsAdopted      atomic.Int64 // completed records of jobs whose dispatcher was gone, stored here (adopt.go)
	AnsweredBusy        atomic.Int64 // hand-overs and adoption offers past their worker's cap, answered busy unread (takequeue.go)
	ExhaustGraced       atomic.Int64 // first deliveries past the attempt limit handed back once (exhaust.go)
	CancelsLeft         atomic.Int64 // cancels of a job in JOBS that a consumer delivered (held elsewhere, or to be redelivered): left to its holder
	// Routed counts batches by why they went to their worker (RouteReason).
	Routed [numRouteReasons]atomic.Int64
	// Transitions counts legal transitions by (from state, event).
	Transitions [numStates][numTriggers]atomic.Int64
}

// TransitionCount returns how often event e was applied in state s.
func (m *Metrics) TransitionCount(s State, e Trigger) int64 {
	if s >= numStates || e >= numTriggers {
		return 0
	}
	return m.Transitions[s][e].Load()
}

// RoutedCount returns how many batches went out for reason r.
func (m *Metrics) RoutedCount(r RouteReason) int64 {
	if r < 0 || r >= numRouteReasons {
		return 0
	}
	return m.Routed[r].Load()
}
