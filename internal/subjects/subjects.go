// Package subjects owns every subject, stream, bucket and key name the system
// uses, with their builders and parsers: the README's subject reference is
// written from it, auth's permissions are built from it, and no other package
// spells a subject. Producers need none of it but the reply subject, which the
// bus package re-exports (bus.ReplySubject).
//
// Every subject that names a job carries its tenant as a token right after the
// kind (mlx.jobs.<tenant>.…, mlx.cancel.<tenant>.…, mlx.results.<tenant>.…,
// mlx.reply.<tenant>.…), so the server's permissions — not a field in the
// message body — bind a producer credential to its own tenant's jobs.
package subjects

import (
	"crypto/sha256"
	"encoding/hex"
	"regexp"
	"strconv"
	"strings"

	"github.com/mlx-serving/mlx-serving/schemas"
)

const (
	// StreamJobs holds queued jobs (work-queue retention, discard-new).
	StreamJobs = "JOBS"
	// StreamResults holds one terminal record per job, under Result(tenant, id).
	// Only dispatchers (and admin) may write it; see docs/RELIABILITY.md.
	StreamResults = "RESULTS"
	// StreamDLQ holds dead-lettered jobs, under DLQ(tenant, id), and
	// messages on JOBS that could not be a job, under RawDLQ(seq).
	StreamDLQ = "DLQ"
	// StreamCancels holds cancel requests, so a job cancelled while queued, or while
	// no dispatcher was running, is still recognised when it is pulled.
	StreamCancels = "CANCELS"
	// StreamLedger holds, under Ledger(tenant, id), what a job's JOBS delivery
	// count does not say: deliveries a dispatcher handed back without offering
	// them to any worker, and attempts started in-process beyond a delivery's
	// first (internal/ledger). Only dispatchers (and admin) read or write it.
	StreamLedger = "LEDGER"
	// BucketWorkers is the worker registry: one key per worker id, expiring by TTL.
	BucketWorkers = "mlx_workers"
	// BucketModels says which models a worker served recently: one key per model
	// (ModelKey), put by the workers that serve it, expiring ModelGrace after the
	// last. Producers read it to fail fast on a model nobody serves.
	BucketModels = "mlx_models"
	// WorkersStream and ModelsStream are the buckets' streams (JetStream names
	// a bucket's stream KV_<bucket>), and WorkerEntries the subject prefix of
	// the registry's keys ($KV.<bucket>.<worker id>).
	WorkersStream = "KV_" + BucketWorkers
	ModelsStream  = "KV_" + BucketModels
	WorkerEntries = "$KV." + BucketWorkers + "."

	// JobsAll matches every job subject, mlx.jobs.<tenant>.<priority>.<job-id>,
	// and the wake-ups on JobsStored too: a core subscriber that wants jobs
	// only checks ParseJob (or subscribes to JobsStream()).
	JobsAll = "mlx.jobs.>"
	// JobsAnyTenant matches every job subject and nothing else (five tokens):
	// the grant of a producer for every tenant (the gateway), which must not
	// reach JobsStored.
	JobsAnyTenant = "mlx.jobs.*.*.*"
	// JobsStored is where JOBS re-publishes the headers (no body) of every job
	// it stored, under JobStored(priority): the dispatchers' wake-up. It is
	// sent only once the job is stored, so a pull it triggers finds it, and it
	// carries no job body, so a burst of jobs costs every dispatcher a few
	// hundred bytes per job, not the job. Four tokens: never a job subject
	// (those have five), and no producer grant (JobsTenant) covers it.
	JobsStored = "mlx.jobs._stored.*"
	// ResultsAll matches every result subject: mlx.results.<tenant>.<job-id>.
	ResultsAll = "mlx.results.>"
	// LedgerAll matches every ledger subject: mlx.ledger.<tenant>.<job-id>.
	LedgerAll = "mlx.ledger.>"
	// DLQAll matches every DLQ subject.
	DLQAll = "mlx.dlq.>"
	// CancelAll matches every cancel subject: mlx.cancel.<tenant>.<job-id>.
	CancelAll = "mlx.cancel.>"
	// CancelAnyTenant matches every cancel subject and nothing else.
	CancelAnyTenant = "mlx.cancel.*.*"
	// AssignAll matches every worker's assignment subject.
	AssignAll = "mlx.worker.*.assign"
	// WorkerCancelAll matches every worker's cancel subject.
	WorkerCancelAll = "mlx.worker.*.cancel"
	// DoneAll matches every worker's terminal hand-over subject.
	DoneAll = "mlx.worker.*.done.*"
	// AttemptAll matches every worker's attempt report subject.
	AttemptAll = "mlx.worker.*.attempt"
	// AdoptAll matches every worker's adoption subject (Adopt).
	AdoptAll = "mlx.worker.*.adopt"
	// AdoptQueue is the queue group every dispatcher serves AdoptAll in: one
	// dispatcher takes each record.
	AdoptQueue = "mlx-adopt"
	// HeaderPlacement carries, on an adoption request, the placement token of
	// the attempt whose record it is (schemas.AssignedJob.Placement).
	HeaderPlacement = "Mlx-Placement"
	// ProgressAll matches every worker's progress subject (Progress).
	ProgressAll = "mlx.worker.*.progress.*.*"
	// ResultsPrefix starts result subjects: mlx.results.<tenant>.<job-id>.
	ResultsPrefix = "mlx.results"
	// ReplyPrefix starts reply subjects: mlx.reply.<tenant>.<…>. A job's reply_to
	// must lie under its tenant's (ReplyNamespace).
	ReplyPrefix = "mlx.reply"

	jobsPrefix   = "mlx.jobs."
	cancelPrefix = "mlx.cancel."
	dlqPrefix    = "mlx.dlq."
	ledgerPrefix = "mlx.ledger."
	workerPrefix = "mlx.worker."
	// rawDLQToken is the tenant token of raw dead letters; a tenant name cannot
	// start with '_', so it never collides with one.
	rawDLQToken = "_raw"
)

// Job is where a job of tenant with the given priority is published.
func Job(tenant, priority, jobID string) string {
	return jobsPrefix + TenantToken(tenant) + "." + priority + "." + jobID
}

// JobAnyPriority matches the one job of tenant with jobID at every priority:
// the subject a producer's publish expects to hold nothing yet
// (Nats-Expected-Last-Subject-Sequence-Subject), since the priority is part of
// the job subject and the stream's one-message-per-subject limit alone would
// take the same id once per priority.
func JobAnyPriority(tenant, jobID string) string {
	return jobsPrefix + TenantToken(tenant) + ".*." + jobID
}

// JobsPriority matches all jobs of one priority, every tenant's: one of
// JOBS' stream subjects.
func JobsPriority(priority string) string { return jobsPrefix + "*." + priority + ".*" }

// JobsConsumerFilter is the filter of one priority's consumer. It ends in '>'
// where the stream subject ends in '*' so that a message published on a literal
// wildcard subject (mlx.jobs.a.normal.>), which the stream stores but a '*'
// filter would never deliver, still reaches a dispatcher and is ended.
func JobsConsumerFilter(priority string) string { return jobsPrefix + "*." + priority + ".>" }

// JobsStream are the subjects JOBS stores: one per priority, so the server
// itself refuses a message on a subject with an unknown priority or the wrong
// number of tokens (the publisher gets "no stream").
func JobsStream() []string {
	out := make([]string, 0, len(schemas.Priorities))
	for _, p := range schemas.Priorities {
		out = append(out, JobsPriority(p))
	}
	return out
}

// JobStored is the wake-up subject JOBS re-publishes a stored job of priority on.
func JobStored(priority string) string { return jobsPrefix + "_stored." + priority }

// JobsTenant matches every job subject of one tenant (a producer's grant).
func JobsTenant(tenant string) string { return jobsPrefix + TenantToken(tenant) + ".*.*" }

// JobRef names one job: tenant and id. The same id in two tenants is two jobs.
type JobRef struct {
	Tenant string // "" is the default tenant
	ID     string
}

// Key is the ref as one string, for maps and logs: "<tenant>/<id>".
func (r JobRef) Key() string { return TenantToken(r.Tenant) + "/" + r.ID }

// ParseJob splits mlx.jobs.<tenant>.<priority>.<job-id>. ok is false when
// the subject does not have that shape, a token is empty or a wildcard, the
// priority is unknown, or the tenant or id is not a valid name: such a message
// cannot be a job.
func ParseJob(subject string) (ref JobRef, priority string, ok bool) {
	rest, found := strings.CutPrefix(subject, jobsPrefix)
	if !found {
		return JobRef{}, "", false
	}
	parts := strings.Split(rest, ".")
	if len(parts) != 3 || !tenantPattern.MatchString(parts[0]) || !idPattern.MatchString(parts[2]) {
		return JobRef{}, "", false
	}
	for _, p := range schemas.Priorities {
		if parts[1] == p {
			return JobRef{Tenant: parts[0], ID: parts[2]}, p, true
		}
	}
	return JobRef{}, "", false
}

// ParseCancel splits mlx.cancel.<tenant>.<job-id>.
func ParseCancel(subject string) (JobRef, bool) { return parseRef(cancelPrefix, subject) }

// ParseResult splits mlx.results.<tenant>.<job-id>.
func ParseResult(subject string) (JobRef, bool) {
	return parseRef(ResultsPrefix+".", subject)
}

// parseRef splits <prefix><tenant>.<job-id>, both valid names.
func parseRef(prefix, subject string) (JobRef, bool) {
	rest, found := strings.CutPrefix(subject, prefix)
	if !found {
		return JobRef{}, false
	}
	tenant, id, found := strings.Cut(rest, ".")
	if !found || !tenantPattern.MatchString(tenant) || !idPattern.MatchString(id) {
		return JobRef{}, false
	}
	return JobRef{Tenant: tenant, ID: id}, true
}

// Result holds the terminal record of a job in RESULTS. The tenant token
// lets a producer's credential read its own tenant's records only (by direct get
// on the subject); a job without a tenant is the "default" tenant's.
func Result(tenant, jobID string) string {
	return ResultsPrefix + "." + TenantToken(tenant) + "." + jobID
}

// ResultsTenant matches every result subject of one tenant.
func ResultsTenant(tenant string) string {
	return ResultsPrefix + "." + TenantToken(tenant) + ".>"
}

// DefaultTenant is the tenant token of jobs that name none.
const DefaultTenant = "default"

// TenantOfToken is the tenant field of a record whose subject carries token:
// the default tenant's is "" (the inverse of the token a "" tenant gets).
func TenantOfToken(token string) string {
	if token == DefaultTenant {
		return ""
	}
	return token
}

// TenantToken is the subject token of tenant: DefaultTenant for "" (a job that
// names no tenant), else the tenant itself.
func TenantToken(tenant string) string {
	if tenant == "" {
		return DefaultTenant
	}
	return tenant
}

// Ledger holds a job's attempt ledger entry in LEDGER.
func Ledger(tenant, jobID string) string { return ledgerPrefix + TenantToken(tenant) + "." + jobID }

// DLQ holds a dead-lettered job in DLQ.
func DLQ(tenant, jobID string) string { return dlqPrefix + TenantToken(tenant) + "." + jobID }

// RawDLQ holds a message on JOBS from which no job could be derived (no
// valid tenant or id in its subject), by its JOBS sequence.
func RawDLQ(seq uint64) string {
	return dlqPrefix + rawDLQToken + "." + strconv.FormatUint(seq, 10)
}

// Cancel is where a cancel request for a job is published (stream CANCELS).
func Cancel(tenant, jobID string) string {
	return cancelPrefix + TenantToken(tenant) + "." + jobID
}

// CancelTenant matches every cancel subject of one tenant (a producer's grant).
func CancelTenant(tenant string) string { return cancelPrefix + TenantToken(tenant) + ".*" }

// Assign is the request/reply subject a worker serves assignments on.
func Assign(workerID string) string { return workerPrefix + workerID + ".assign" }

// WorkerCancel is where the dispatcher that placed a job on a worker
// forwards its cancel (core NATS, body schemas.CancelMsg): workers never read
// other jobs' cancels.
func WorkerCancel(workerID string) string { return workerPrefix + workerID + ".cancel" }

// Done is where a worker hands a job's terminal record to the dispatcher
// that placed it (request/reply, body schemas.ResultMsg, answer
// schemas.FinishReplyMsg): mlx.worker.<worker-id>.done.<dispatcher-id>. The
// worker id in the subject is what the server's permissions vouch for: the
// dispatcher takes a record only for a job it placed on that worker, at that
// attempt. A dispatcher that is gone has no responder, so the worker learns at
// once, and offers a completed record to the other dispatchers (Adopt).
func Done(workerID, dispatcherID string) string {
	return workerPrefix + workerID + ".done." + dispatcherID
}

// DoneForDispatcher matches every hand-over addressed to one dispatcher.
func DoneForDispatcher(dispatcherID string) string { return workerPrefix + "*.done." + dispatcherID }

// DoneFromWorker matches every hand-over one worker may make (its grant).
func DoneFromWorker(workerID string) string { return workerPrefix + workerID + ".done.*" }

// Progress is where a worker sends the dispatcher that placed a job a copy of
// each token event it publishes on the job's reply subject (core NATS, body
// schemas.TokenEventMsg): mlx.worker.<worker-id>.progress.<dispatcher-id>.<tenant>.
// The dispatcher keeps what the caller received from it, the resume of a retry
// after a silent death and the text of the records it writes itself. Only the
// worker id is vouched for, by the server's permissions (ProgressFromWorker):
// every worker credential may publish on every reply subject, so the
// dispatcher takes an event only here and only for a job it placed on that
// worker, at that attempt. The tenant token only finds the job (the event
// names its id, not its tenant); a wrong one finds none or another worker's job,
// which the worker check refuses.
func Progress(workerID, dispatcherID, tenant string) string {
	return workerPrefix + workerID + ".progress." + dispatcherID + "." + TenantToken(tenant)
}

// ProgressForDispatcher matches every progress event addressed to one dispatcher.
func ProgressForDispatcher(dispatcherID string) string {
	return workerPrefix + "*.progress." + dispatcherID + ".*"
}

// ProgressFromWorker matches every progress event one worker may send (its grant).
func ProgressFromWorker(workerID string) string {
	return workerPrefix + workerID + ".progress.*.*"
}

// ParseProgress splits mlx.worker.<worker-id>.progress.<dispatcher-id>.<tenant>
// into the worker id and the tenant token; ok is false for any other shape or
// a token that is no valid name.
func ParseProgress(subject string) (workerID, tenant string, ok bool) {
	rest, found := strings.CutPrefix(subject, workerPrefix)
	if !found {
		return "", "", false
	}
	parts := strings.Split(rest, ".")
	if len(parts) != 4 || parts[1] != "progress" || !idPattern.MatchString(parts[0]) ||
		!idPattern.MatchString(parts[2]) || !tenantPattern.MatchString(parts[3]) {
		return "", "", false
	}
	return parts[0], parts[3], true
}

// Adopt is where a worker offers a job's terminal record to any dispatcher
// when the one that placed the job is gone (no responder on Done): request/
// reply, body schemas.ResultMsg, header HeaderPlacement, answer
// schemas.FinishReplyMsg. A dispatcher stores the record only when the
// placement token checks for that job, attempt, model and this worker id
// (internal/placement), which the server's permissions vouch for.
func Adopt(workerID string) string { return workerPrefix + workerID + ".adopt" }

// Attempt carries a worker's report of a retryable failed attempt.
func Attempt(workerID string) string { return workerPrefix + workerID + ".attempt" }

// WorkerOf returns the worker id of mlx.worker.<id>.<verb>, or "".
func WorkerOf(subject string) string {
	rest, ok := strings.CutPrefix(subject, workerPrefix)
	if !ok {
		return ""
	}
	id, _, ok := strings.Cut(rest, ".")
	if !ok {
		return ""
	}
	return id
}

// Reply is the default reply subject for a job's token events.
func Reply(tenant, jobID string) string {
	return ReplyPrefix + "." + TenantToken(tenant) + "." + jobID
}

// ReplyNamespace matches every reply subject of tenant: a job's reply_to must
// lie under it (the dispatcher fails a job whose reply_to does not), and a
// producer credential may subscribe only there.
func ReplyNamespace(tenant string) string { return ReplyPrefix + "." + TenantToken(tenant) + ".>" }

// ReplyInTenant reports whether replyTo is a literal subject under tenant's reply
// namespace.
func ReplyInTenant(tenant, replyTo string) bool {
	rest, ok := strings.CutPrefix(replyTo, ReplyPrefix+"."+TenantToken(tenant)+".")
	if !ok || rest == "" {
		return false
	}
	for _, tok := range strings.Split(rest, ".") {
		if tok == "" || strings.ContainsAny(tok, "*> \t\r\n") {
			return false
		}
	}
	return true
}

// tenantPattern is the job schema's tenant pattern (schemas/job.json).
var tenantPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,63}$`)

// idPattern is the job schema's id pattern (schemas/job.json#/definitions/id).
var idPattern = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// ValidID reports whether s is a valid job (or worker, dispatcher) id: one
// subject token of the job schema's id pattern.
func ValidID(s string) bool { return idPattern.MatchString(s) }

// RecordTenant is the tenant a job's terminal record is kept under, given the
// tenant the job names: that tenant when it is a valid name, else "" (the
// default tenant), since an invalid job's tenant may be what broke its schema
// and must not become a subject token.
func RecordTenant(tenant string) string {
	if tenantPattern.MatchString(tenant) {
		return tenant
	}
	return ""
}

// ModelKey is a model's key in BucketModels. Model names may hold characters a
// KV key cannot (spaces, ':', '@'), so the key is a hash of the name.
func ModelKey(model string) string {
	sum := sha256.Sum256([]byte(model))
	return "m" + hex.EncodeToString(sum[:16])
}

// ModelEntry is the subject a model's announcement is stored on in
// BucketModels (its KV stream's subject for ModelKey(model)).
func ModelEntry(model string) string { return "$KV." + BucketModels + "." + ModelKey(model) }

// ImportedAPIPrefix is the JetStream API prefix of a client in an account of
// its own (package auth: every tenant's producer, every worker, the gateway):
// its account imports the few JetStream calls and KV writes it is granted from
// the account JetStream lives in, under this prefix, since the server answers
// $JS.API itself in an account without JetStream. KV writes go to
// ImportedAPIPrefix.$KV.<bucket>.<key> there (nats.go's KV with an API prefix).
const ImportedAPIPrefix = "$JS.MLX.API"

// APIPrefixForUser is the JetStream API prefix of a connection as user:
// ImportedAPIPrefix for the users auth init puts in accounts of their own
// (producer-<tenant>, worker-<id>, gateway), "" (the default $JS.API) for
// everyone else — dispatchers, admin, users of other servers.
func APIPrefixForUser(user string) string {
	if user == "gateway" || strings.HasPrefix(user, "producer-") || strings.HasPrefix(user, "worker-") {
		return ImportedAPIPrefix
	}
	return ""
}
