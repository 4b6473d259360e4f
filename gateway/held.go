package gateway

import "github.com/mlx-serving/mlx-serving/schemas"

// submitted is what a request keeps of its job once the job is queued: its id
// and tenant (logs, cancels) and model (the answer's). The job itself holds the
// prompt or messages, tools and schemas, up to the body's size decoded (0.96 MB
// held the standalone gateway ~2.7 MB), and the request waits for its answer up
// to gateway_request_timeout (10 min); kept, they made a tenant's held requests
// cost memory without bound (red team round 11, F3). The answer reads none of
// them: a format is built from the request before (chat reads tool calls from
// the output alone), and echo is not supported.
func submitted(job *schemas.JobRequest) *schemas.JobRequest {
	return &schemas.JobRequest{ID: job.ID, Tenant: job.Tenant, Model: job.Model}
}
