package gateway

import (
	"encoding/json"
	"errors"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// checkJob validates job before anything looks for workers, so a bad request
// is a 400 whatever the fleet's state (Submit validates again, which costs
// microseconds), and then compiles its response schema.
func checkJob(job *schemas.JobRequest, spec runSpec) *apiError {
	data, err := json.Marshal(job)
	if err != nil {
		return errInternal("Encoding the job failed.")
	}
	if err := schemas.Validate(schemas.Job, data); err != nil {
		var verr *schemas.ValidationError
		if errors.As(err, &verr) {
			return fromValidation(verr, spec.params)
		}
		return errInternal("Validating the job failed.")
	}
	// Compiled here, as a tool's parameters are, once the schema's depth and
	// size bounds held (compiling first would be the cost they bound): one no
	// validator can compile was queued, took a worker slot and its compile,
	// and came back a 400 with no param (red team round 17, HTTP L1).
	if job.JSONSchema != nil {
		return compileSchema(job.JSONSchema, "response_format.json_schema.schema")
	}
	return nil
}
