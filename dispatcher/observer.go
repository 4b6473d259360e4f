package dispatcher

import "sync/atomic"

// Observer is told what the dispatcher does, for metrics: the pattern of
// worker.Observer, with plain names for values, so that neither dispatcher nor
// metrics imports the other. Calls come from the dispatcher's goroutines, many while it holds its
// lock: an implementation must return at once and must not call back into the
// dispatcher. Package metrics provides the Prometheus one (metrics.Dispatcher),
// wired by cmd/mlx-serving; nil in Config means nobody listens. The
// dispatcher's own Metrics count the same events, for tests and in-process
// readers.
type Observer interface {
	// Series is told once, at New, every value the labelled counts take: the
	// terminal states, the route reasons and the table's legal (state, event)
	// pairs, so a count that never moved reads 0 instead of being absent.
	Series(finished, reasons, anomalies []string, transitions [][2]string)
	// Pulled: n messages were fetched from JOBS (deliveries).
	Pulled(n int)
	// Routed: a batch goes to the worker chosen for reason (RouteReason).
	Routed(reason string)
	// Accepted: a worker accepted a batch of jobs (attempts started).
	Accepted(jobs int)
	// Refused: a worker answered an assignment full or rejected.
	Refused()
	// AssignFailed: an assignment timed out or failed to send.
	AssignFailed()
	// Retried: an attempt was scheduled after a retryable failure.
	Retried()
	// Finished: a job reached the terminal state (State).
	Finished(state string)
	// AlreadyFinished: a delivery was acked without running because RESULTS
	// already had the job.
	AlreadyFinished()
	// NotAJob: a message on JOBS no job could be derived from was dead-lettered
	// raw and terminated.
	NotAJob()
	// Forged: a terminal record or attempt report from a worker that does not
	// run that attempt was refused.
	Forged()
	// WorkerLost: a worker's registry entry was deleted or went stale.
	WorkerLost()
	// DeafTick: a tick at which no heartbeat could have been heard since the
	// last one (hearing.go); no worker was judged lost for that time.
	DeafTick()
	// WorkerRestarted: a worker came back as a new process; its jobs were retried.
	WorkerRestarted()
	// Transition: a legal transition left state from on event.
	Transition(from, event string)
	// IllegalTransition: the table refused a transition (a bug if it happens).
	IllegalTransition()
	// WriteFailed: the store refused a try of a terminal record (or its
	// dead letter); it is tried again (writeretry.go).
	WriteFailed()
	// RecordsHeld: delta (+1 or -1) records held to be written again (the
	// store refused or did not answer them); while any is held, no job is
	// placed (writeretry.go).
	RecordsHeld(delta int)
	// Anomaly: a message the dispatcher ignored or corrected, by kind
	// (Anomalies): each is a misbehaving client or credential, or a bug.
	Anomaly(kind string)
}

// Anomaly kinds, the values of Observer.Anomaly.
const (
	// AnomalyBadCancel: a cancel (stored or live) whose subject or body is no
	// cancel: ignored.
	AnomalyBadCancel = "bad_cancel"
	// AnomalyBaseClamped: a job's metadata asked for an attempt base that would
	// number attempts past the schemas' maximum: clamped.
	AnomalyBaseClamped = "attempt_base_clamped"
	// AnomalyDuplicateMsg: a second JOBS message for a job this dispatcher
	// holds (same id, another stream sequence): terminated.
	AnomalyDuplicateMsg = "duplicate_job_message"
	// AnomalyOversizedProgress: a progress event larger than any tracked job's
	// could be: dropped unread.
	AnomalyOversizedProgress = "oversized_progress"
	// AnomalyDeadLetterRefused: the DLQ refused a job's dead letter (full,
	// or the letter too large): the job ended with its terminal record only,
	// and replay cannot bring it back.
	AnomalyDeadLetterRefused = "dead_letter_refused"
	// AnomalyRelayed: a message on a worker's done, attempt or progress
	// subject without a reply subject: not sent by a worker but relayed there
	// by the server as the answer to someone's JetStream request (see
	// subjects.FromSender); dropped.
	AnomalyRelayed = "relayed_message"
	// AnomalyAttemptTimeout: a worker held an attempt past AttemptTimeout
	// without ending it; the attempt was given up and the job retried.
	AnomalyAttemptTimeout = "attempt_timeout"
	// AnomalyLedgerWrite: the attempt ledger refused or failed a write (LEDGER
	// full, JetStream unavailable): a hand-back counted as an attempt, or a
	// retry was handed back to JOBS instead of started in-process.
	AnomalyLedgerWrite = "ledger_write_failed"
	// AnomalyAdopted: a worker's completed record whose dispatcher was gone
	// (no responder on its done subject) was stored by this one (adopt.go):
	// a dispatcher died or stopped with jobs running.
	AnomalyAdopted = "record_adopted"
	// AnomalyBusy: a worker had as many hand-overs or adoption offers
	// waiting as it has jobs here (plus two; adoptions: 32), and one more was
	// answered busy unread (takequeue.go): a worker catching up after its
	// dispatcher did not answer for a while, or a credential flooding.
	AnomalyBusy = "answered_busy"
)

// Anomalies lists every Anomaly kind.
func Anomalies() []string {
	return []string{AnomalyBadCancel, AnomalyBaseClamped, AnomalyDuplicateMsg, AnomalyOversizedProgress, AnomalyDeadLetterRefused, AnomalyRelayed, AnomalyAttemptTimeout, AnomalyLedgerWrite, AnomalyAdopted, AnomalyBusy}
}

// nopObserver is the Observer when none is configured.
type nopObserver struct{}

func (nopObserver) Series([]string, []string, []string, [][2]string) {}
func (nopObserver) Pulled(int)                                       {}
func (nopObserver) Routed(string)                                    {}
func (nopObserver) Accepted(int)                                     {}
func (nopObserver) Refused()                                         {}
func (nopObserver) AssignFailed()                                    {}
func (nopObserver) Retried()                                         {}
func (nopObserver) Finished(string)                                  {}
func (nopObserver) AlreadyFinished()                                 {}
func (nopObserver) NotAJob()                                         {}
func (nopObserver) Forged()                                          {}
func (nopObserver) WorkerLost()                                      {}
func (nopObserver) DeafTick()                                        {}
func (nopObserver) WorkerRestarted()                                 {}
func (nopObserver) Transition(string, string)                        {}
func (nopObserver) IllegalTransition()                               {}
func (nopObserver) WriteFailed()                                     {}
func (nopObserver) RecordsHeld(int)                                  {}
func (nopObserver) Anomaly(string)                                   {}

// tally is where the dispatcher counts: its own Metrics and the Observer, one
// call per event.
type tally struct {
	m   *Metrics
	obs Observer
}

// count is the dispatcher's tally.
func (d *Dispatcher) count() tally {
	if d.cfg.Observer == nil {
		return tally{&d.metrics, nopObserver{}}
	}
	return tally{&d.metrics, d.cfg.Observer}
}

// series tells the observer every label value, once.
func (t tally) series() {
	var finished, reasons []string
	var pairs [][2]string
	for s := range numStates {
		if s.Terminal() {
			finished = append(finished, s.String())
		}
		for e := range numTriggers {
			if _, err := Transition(s, e); err == nil {
				pairs = append(pairs, [2]string{s.String(), e.String()})
			}
		}
	}
	for _, r := range RouteReasons() {
		reasons = append(reasons, r.String())
	}
	t.obs.Series(finished, reasons, Anomalies(), pairs)
}

func (t tally) pulled(n int) { t.m.JobsPulled.Add(int64(n)); t.obs.Pulled(n) }

func (t tally) routed(r RouteReason) { t.m.Routed[r].Add(1); t.obs.Routed(r.String()) }

func (t tally) accepted(jobs int) {
	t.m.Batches.Add(1)
	t.m.JobsAssigned.Add(int64(jobs))
	t.obs.Accepted(jobs)
}

func (t tally) refused() { t.m.AssignFull.Add(1); t.obs.Refused() }

func (t tally) assignFailed() { t.m.AssignErrors.Add(1); t.obs.AssignFailed() }

func (t tally) retried() { t.m.Retries.Add(1); t.obs.Retried() }

// finished counts a job reaching terminal state s; other states are no end.
func (t tally) finished(s State) {
	var c *atomic.Int64
	switch s {
	case StateCompleted:
		c = &t.m.Completed
	case StateFailed:
		c = &t.m.Failed
	case StateCancelled:
		c = &t.m.Cancelled
	case StateExpired:
		c = &t.m.Expired
	case StateDeadLettered:
		c = &t.m.DeadLettered
	default:
		return
	}
	c.Add(1)
	t.obs.Finished(s.String())
}

func (t tally) alreadyFinished() { t.m.AlreadyFinished.Add(1); t.obs.AlreadyFinished() }

func (t tally) notAJob() { t.m.NotAJob.Add(1); t.obs.NotAJob() }

func (t tally) baseClamped() { t.m.BaseClamped.Add(1); t.obs.Anomaly(AnomalyBaseClamped) }

func (t tally) duplicateMsg() { t.m.DuplicateMsgs.Add(1); t.obs.Anomaly(AnomalyDuplicateMsg) }

func (t tally) badCancel() { t.m.BadCancels.Add(1); t.obs.Anomaly(AnomalyBadCancel) }

func (t tally) oversizedProgress() {
	t.m.OversizedProgress.Add(1)
	t.obs.Anomaly(AnomalyOversizedProgress)
}

func (t tally) deadLetterRefused() {
	t.m.DeadLettersRefused.Add(1)
	t.obs.Anomaly(AnomalyDeadLetterRefused)
}

// cancelLeft counts a cancel left to the job's holder (cancelInStream); no
// observer series: it is the ordinary case with several dispatchers.
func (t tally) cancelLeft() { t.m.CancelsLeft.Add(1) }

func (t tally) parked() { t.m.Parked.Add(1) }

// handBackNoted counts a delivery handed back with its next attempt noted; no
// observer series: it is what every graceful stop does.
func (t tally) handBackNoted() { t.m.HandBacksNoted.Add(1) }

func (t tally) ledgerWriteFailed() { t.m.LedgerWriteFailed.Add(1); t.obs.Anomaly(AnomalyLedgerWrite) }

func (t tally) adopted() { t.m.RecordsAdopted.Add(1); t.obs.Anomaly(AnomalyAdopted) }
func (t tally) busy()    { t.m.AnsweredBusy.Add(1); t.obs.Anomaly(AnomalyBusy) }

func (t tally) relayed() { t.m.Relayed.Add(1); t.obs.Anomaly(AnomalyRelayed) }

func (t tally) attemptTimedOut() { t.m.AttemptTimeouts.Add(1); t.obs.Anomaly(AnomalyAttemptTimeout) }

func (t tally) strandedRemoved() { t.m.StrandedRemoved.Add(1) }

func (t tally) writeFailed() { t.m.RecordWriteFailures.Add(1); t.obs.WriteFailed() }

func (t tally) forged() { t.m.ForgedRecords.Add(1); t.obs.Forged() }

// superseded counts a late record of an attempt given up; no observer series:
// a paused or partitioned worker's ordinary aftermath.
func (t tally) superseded() { t.m.SupersededRecords.Add(1) }

func (t tally) workerLost() { t.m.WorkersLost.Add(1); t.obs.WorkerLost() }

func (t tally) deafTick()        { t.m.DeafTicks.Add(1); t.obs.DeafTick() }
func (t tally) workerRestarted() { t.m.WorkersRestarted.Add(1); t.obs.WorkerRestarted() }

func (t tally) transition(from State, e Trigger) {
	t.m.Transitions[from][e].Add(1)
	t.obs.Transition(from.String(), e.String())
}

func (t tally) illegal() { t.m.IllegalTransitions.Add(1); t.obs.IllegalTransition() }
