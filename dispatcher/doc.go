// Package dispatcher pulls jobs from JetStream, batches them per model and routes
// the batches to workers with free slots, and owns every job until it reached a
// terminal state: retries with backoff and migration, dead letters, expiry and
// cancellation.
//
// # Consumption
//
// JOBS is consumed through one durable pull consumer per priority
// (<prefix>-high|normal|low, filter mlx.jobs.*.<p>.>), shared by every dispatcher
// process: a work-queue stream accepts such non-overlapping filters, and a
// single consumer would hand out messages in stream order, so a deep low queue
// would hide a high job behind it. With one consumer per priority the
// dispatcher decides the mix itself: each pull round splits its credit across
// the priorities by smooth weighted round robin (default weights 4:2:1), and
// credit a priority cannot use (its queue is empty) goes to the others. The
// same weighted pick chooses which held job leads the next batch. Higher
// priorities therefore get most of the capacity, FIFO holds within a priority
// (jobs are ordered by stream sequence), and a lower priority is never starved:
// under saturation it still gets weight/sum of the picks (1/7 for low).
//
// Credit is what free slots of ready workers plus one batch window (MaxBatch)
// can take, minus jobs already held; no free slot means no pull, and
// jobs wait in JetStream, whose discard-new limit turns into "queue full" at the
// producer. Pulls are non-blocking (FetchNoWait); new jobs wake the puller
// through JOBS' re-publish of each stored job's headers (subjects.JobsStored:
// sent after the store, so the pull finds the job, and without its body, so a
// burst does not copy every job to every dispatcher), redeliveries through a
// short poll. JetStream sends that wake-up (and the producer's ack) before it
// tells the consumers, so a no-wait pull right after it can miss the job; an
// announced job that was not pulled is waited for once by a pull that waits
// (storedGrace), instead of being left to the poll. A batch short of its size waits up to MaxWait for company only
// while the last fetch left jobs in the consumer (its NumPending); a lone job
// on an idle queue goes out at once.
//
// A held job whose model no live worker has waits ModelWait for one that is
// (re)loading it, then is dead-lettered as model_not_available; a model that
// no worker announced within the models bucket's grace (registry.ModelServed,
// looked up once per model outside the lock, cached briefly) is dead-lettered
// at once, so jobs for a model nobody serves cannot hold the credit that
// every tenant shares. With no live worker at all, jobs wait: an outage.
//
// A message is acked only once its terminal record is stored in RESULTS: one
// this dispatcher wrote (its own terminals, and the records workers hand it on
// mlx.worker.<id>.done.<dispatcher-id> for jobs it placed — the publish ack
// comes first), or one another dispatcher wrote, learnt from an ordered consumer
// on RESULTS, never from a core subscription, which can see a message that was
// never stored. Dispatchers are RESULTS' only writers (terminal.go says why).
// Each record is validated once: a worker's hand-over against the result
// schema when it arrives (up to 32 decoded at once), the dispatcher's own
// records by construction; results.Finish does not validate again.
// While held a message is kept alive with in-progress acks every AckWait/3.
// A message from which no job can be derived is dead-lettered raw and
// terminated; a job whose body disagrees with its subject's tenant fails. MaxDeliver is unlimited: the attempt number is the
// delivery count plus the retries done in-process, moved by the job's entry
// in the attempt ledger (LEDGER, ledger.go): a dispatcher that stops notes the
// attempt each job it hands back would run next, so a hand-back uses none,
// and notes each in-process retry before it starts, so no later delivery
// numbers an attempt that already ran. MaxAttempts bounds the number. A
// dispatcher that crashes notes nothing: its delivery counts as an attempt.
//
// # Lifecycle
//
// Every job state change goes through Transition, one table of
// (state × trigger → state); illegal transitions are logged and counted in
// Metrics.IllegalTransitions. A redelivered job whose RESULTS record exists is
// acked without running (looked up on every delivery, while the body is
// validated: a cluster's consumer can redeliver with a count of 1 after a
// leader change, a crashed server forgets delivery counts it had not flushed,
// and a finished job's id submitted again is a new message); one with a
// record in CANCELS is cancelled (stored cancels are read at start and followed,
// into memory: no lookup per job), one past its deadline expired, an invalid one
// failed with invalid_request, all without running. Running jobs are cancelled
// through their worker (mlx.worker.<id>.cancel), forwarded by the dispatcher
// that placed them.
//
// # Routing and retries
//
// A worker's free slots are its slots minus this dispatcher's jobs on it minus
// the other dispatchers' share of its heartbeat's in_flight. A job's slot comes
// back the moment its terminal record or attempt report is seen, not with the
// next heartbeat (about a second later): the worker frees a slot before it
// makes the job's end visible, so the count never runs below the truth.
//
// Where a batch goes is a Router's choice (router.go): the prefix policy
// (default) hashes each job's prompt once at intake (internal/prefix) and
// sends a batch to the worker whose heartbeat advertises the longest prefix of
// its lead job, among workers with a free slot whose load is within
// RouteMaxSkew of the least loaded one; other jobs of the model join that batch
// only if that worker is as good a home for them, or they have none, so
// conversations stick to their warm worker. Otherwise, and with the
// least_loaded policy, the least loaded worker with a free slot gets it.
// Metrics.Routed counts the reasons.
//
// The worker registry (KV mlx_workers) is watched; a worker is lost when its
// entry is deleted or not updated for WorkerTTL, and its jobs are retried. A
// worker whose heartbeat names a new process (started_at) restarted, maybe
// within the TTL: the jobs its earlier process ran are retried the same way,
// and it stays routable. A per-worker circuit breaker (internal/breaker:
// closed/open/half-open, the one table the worker's runtime breaker walks too)
// stops routing to a worker whose assignments keep failing. A worker that
// answers an offer full or rejected is offered nothing more until it heart-beats
// again and refusalHold (100 ms) has passed, so neither a busy worker nor one
// re-putting its own registry entry draws a tight loop of re-offers; a full
// that states room for the whole batch contradicts itself and counts as a
// breaker failure (a credential that refuses every offer so). While a job runs
// the dispatcher accumulates the text of the current attempt from the copies
// of its token events that the job's worker sends on its own progress subject
// (progress.go: never from the reply subject, where any worker may publish),
// up to what a resume may carry, so a retry after a lost worker resumes
// (schemas.Resume) where the caller's stream stopped; a worker's attempt
// report carries that text itself. An attempt that ends silently (a lost or restarted worker, an
// assignment timeout) is learnt on another subscription than its token
// events, so its retry is requeued only after a barrier (nats.Conn.Barrier)
// behind every event received so far: the resume then holds all the text the
// dispatcher had received before it learnt of the end. An attempt its worker
// holds past AttemptTimeout is stopped for a retry: the worker reports it with
// the text it sent and the retry resumes there, or, without a report within
// DeadlineGrace, it is given up like a silent death, so a worker that
// heart-beats but never answers holds no job for ever. Retries wait an exponential backoff with jitter; out of
// attempts a job goes to DLQ and gets a terminal failed attempts_exhausted.
//
// # Shutdown
//
// Run, once its context ends, stops pulling, naks the jobs not on a worker,
// waits up to DrainTimeout for the running ones (not with NoDrain), cancels
// its other I/O and then waits up to WriteGrace for the terminal writes in
// flight and the hand-overs already received: they run under their own
// context (tctx), so a stop does not cut a record being stored and leave its
// job naked to run again. What is left after the grace fails and is naked.
//
// A job whose dispatcher dies while it runs and that completes on its worker
// is not run again: the worker offers its record to the other dispatchers
// with the assignment's placement token, and one stores it (adopt.go).
// Known limit: a dispatcher that dies cannot hand over the text streamed so
// far; if the job does not finish on its worker before the redelivery, the
// next attempt starts from scratch on the caller's stream.
//
// # Metrics
//
// Every count goes through one place (observer.go): the dispatcher's own
// Metrics (atomics, for tests and in-process readers) and Config.Observer,
// told with plain names. metrics.Dispatcher is the Prometheus Observer;
// cmd/mlx-serving wires it, so neither package imports the other, as for the
// worker (worker.Observer).
//
// # Tests
//
// Tests run against a real embedded server (internal/testenv) and fake workers
// (internal/fakeworker, scripted per attempt), the same fake the bench's
// dispatcher ceiling uses.
package dispatcher
