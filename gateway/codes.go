package gateway

import (
	"net/http"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// httpAnswer is how a failed job's wire error code reaches the client.
type httpAnswer struct {
	status int
	typ    string
	code   string // the OpenAI error code; empty repeats the wire code
}

var (
	answerClient      = httpAnswer{status: http.StatusBadRequest, typ: typeInvalidRequest}
	answerUnavailable = httpAnswer{status: http.StatusServiceUnavailable, typ: typeServer} // clients retry 503
	answerServer      = httpAnswer{status: http.StatusInternalServerError, typ: typeServer}
)

// resultAnswers maps every code of schemas.Codes() (codes/errors.json) to an HTTP
// answer; TestResultAnswersCoverCodes fails when a code is added there and not here,
// or one here no longer exists. A code missing at run time (a newer worker's)
// still answers: 500 with the wire code, like answerServer.
var resultAnswers = map[string]httpAnswer{
	// The request itself is wrong: retrying cannot help.
	schemas.CodeInvalidRequest:  answerClient,
	schemas.CodeInvalidParams:   answerClient,
	schemas.CodeInvalidSchema:   answerClient,
	schemas.CodeContextExceeded: {status: http.StatusBadRequest, typ: typeInvalidRequest, code: "context_length_exceeded"},

	schemas.CodeDeadlineExceeded: {status: http.StatusGatewayTimeout, typ: typeTimeout},

	// The model may come back.
	schemas.CodeModelNotLoaded:    answerUnavailable,
	schemas.CodeModelLoadFailed:   answerUnavailable,
	schemas.CodeModelNotAvailable: answerUnavailable,

	// The fleet failed the job.
	schemas.CodeParseError:        answerServer,
	schemas.CodeMethodNotFound:    answerServer,
	schemas.CodeTooManyModels:     answerServer,
	schemas.CodeGenerationFailed:  answerServer,
	schemas.CodeOutOfMemory:       answerServer,
	schemas.CodeBatchFailed:       answerServer, // a failed step, every attempt
	schemas.CodeDuplicateRequest:  answerServer,
	schemas.CodeShuttingDown:      answerServer,
	schemas.CodeRuntimeBusy:       answerUnavailable, // a tenant over its compile budget there: retry
	schemas.CodeRuntimeError:      answerServer,
	schemas.CodeInvalidMessage:    answerServer,
	schemas.CodeRuntimeCrashed:    answerServer,
	schemas.CodeRuntimeDown:       answerServer,
	schemas.CodeWorkerShutdown:    answerServer,
	schemas.CodeWorkerDraining:    answerServer,
	schemas.CodeCancelled:         answerServer,
	schemas.CodeAttemptsExhausted: answerServer,
	schemas.CodeAssignFailed:      answerServer,
	schemas.CodeWorkerRestarted:   answerServer,
	schemas.CodeWorkerLost:        answerServer,
	schemas.CodeAttemptTimeout:    answerServer,
	schemas.CodeRedelivered:       answerServer,
	schemas.CodeNotAJob:           answerServer,
	schemas.CodeResultTooLarge:    answerServer, // the output outgrew the bus; the record holds what fits
	schemas.CodeHandOverFailed:    answerServer,
}

// answerFor maps a failed job's error code and message to an HTTP answer.
func answerFor(code, msg string) *apiError {
	a, ok := resultAnswers[code]
	if !ok {
		a = answerServer
	}
	if code == "" {
		code = "job_failed"
	}
	if a.code != "" {
		code = a.code
	}
	return &apiError{Status: a.status, Type: a.typ, Code: code, Message: msg}
}
