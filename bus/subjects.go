package bus

import "regexp"

// Every subject, stream and bucket name the system uses lives in this file; the
// README's subject reference is written from it.

const (
	// StreamJobs holds queued jobs (work-queue retention, discard-new).
	StreamJobs = "JOBS"
	// StreamResults holds one terminal record per job, under ResultSubject(tenant, id).
	StreamResults = "RESULTS"
	// StreamDLQ holds dead-lettered jobs, under DLQSubject(id).
	StreamDLQ = "DLQ"
	// StreamCancels holds cancel requests, so a job cancelled while queued, or while
	// no dispatcher was running, is still recognised when it is pulled.
	StreamCancels = "CANCELS"
	// BucketWorkers is the worker registry: one key per worker id, expiring by TTL.
	BucketWorkers = "mlx_workers"

	// SubjectJobsAll matches every job subject: mlx.jobs.<priority>.<job-id>.
	SubjectJobsAll = "mlx.jobs.>"
	// SubjectResultsAll matches every result subject: mlx.results.<tenant>.<job-id>.
	SubjectResultsAll = "mlx.results.>"
	// SubjectDLQAll matches every DLQ subject: mlx.dlq.<job-id>.
	SubjectDLQAll = "mlx.dlq.>"
	// SubjectCancelAll matches every cancel subject: mlx.cancel.<job-id>.
	SubjectCancelAll = "mlx.cancel.>"
	// SubjectAttemptsAll matches every attempt report: mlx.attempts.<job-id> (core NATS).
	SubjectAttemptsAll = "mlx.attempts.>"
	// SubjectAssignAll matches every worker's assignment subject.
	SubjectAssignAll = "mlx.worker.*.assign"
	// ResultsPrefix starts result subjects: mlx.results.<tenant>.<job-id>.
	ResultsPrefix = "mlx.results"
	// ReplyPrefix starts default reply subjects: mlx.reply.<tenant>.<job-id>.
	ReplyPrefix = "mlx.reply"
)

// JobSubject is where a job of the given priority is published.
func JobSubject(priority, jobID string) string { return "mlx.jobs." + priority + "." + jobID }

// JobsPrioritySubject matches all jobs of one priority.
func JobsPrioritySubject(priority string) string { return "mlx.jobs." + priority + ".*" }

// ResultSubject holds the terminal record of a job in RESULTS. The tenant token
// lets a producer's credential read its own tenant's records only (by direct get
// on the subject); a job without a tenant is the "default" tenant's, as for replies.
func ResultSubject(tenant, jobID string) string {
	return ResultsPrefix + "." + tenantToken(tenant) + "." + jobID
}

// ResultsTenantSubject matches every result subject of one tenant.
func ResultsTenantSubject(tenant string) string {
	return ResultsPrefix + "." + tenantToken(tenant) + ".>"
}

// DefaultTenant is the tenant token of jobs that name none.
const DefaultTenant = "default"

func tenantToken(tenant string) string {
	if tenant == "" {
		return DefaultTenant
	}
	return tenant
}

// DLQSubject holds a dead-lettered job in DLQ.
func DLQSubject(jobID string) string { return "mlx.dlq." + jobID }

// CancelSubject is where a cancel request for a job is published (stream CANCELS).
func CancelSubject(jobID string) string { return "mlx.cancel." + jobID }

// AttemptSubject carries a worker's report of a retryable failed attempt.
func AttemptSubject(jobID string) string { return "mlx.attempts." + jobID }

// AssignSubject is the request/reply subject a worker serves assignments on.
func AssignSubject(workerID string) string { return "mlx.worker." + workerID + ".assign" }

// ReplySubject is the default reply subject for a job's token events.
func ReplySubject(tenant, jobID string) string {
	return ReplyPrefix + "." + tenantToken(tenant) + "." + jobID
}

// tenantPattern is the job schema's tenant pattern (schemas/job.json).
var tenantPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,63}$`)

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
