package gateway

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// OpenAI error types, as its API and client libraries name them.
const (
	typeInvalidRequest = "invalid_request_error"
	typeAuthentication = "authentication_error"
	typeRateLimit      = "rate_limit_error"
	typeServer         = "server_error"
	typeTimeout        = "timeout_error"
)

// apiError is an error answered in OpenAI's format:
// {"error":{"message","type","param","code"}}.
type apiError struct {
	Status     int
	Message    string
	Type       string
	Param      string // empty means null
	Code       string // empty means null
	RetryAfter time.Duration
	// NoRetry sends X-Should-Retry: false, which OpenAI's clients obey: an
	// answer whose retry cannot succeed although its status says it might.
	NoRetry bool
}

func (e *apiError) Error() string { return fmt.Sprintf("%d %s: %s", e.Status, e.Code, e.Message) }

type errorBody struct {
	Error errorDetail `json:"error"`
}

type errorDetail struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    *string `json:"code"`
}

func (e *apiError) body() errorBody {
	d := errorDetail{Message: e.Message, Type: e.Type}
	if e.Param != "" {
		p := e.Param
		d.Param = &p
	}
	if e.Code != "" {
		c := e.Code
		d.Code = &c
	}
	return errorBody{Error: d}
}

func writeError(w http.ResponseWriter, e *apiError) {
	if e.RetryAfter > 0 {
		secs := int((e.RetryAfter + time.Second - 1) / time.Second)
		w.Header().Set("Retry-After", strconv.Itoa(secs))
	}
	if e.NoRetry {
		w.Header().Set("X-Should-Retry", "false")
	}
	if e.Status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="mlx-serving"`)
	}
	writeJSON(w, e.Status, e.body())
}

func writeJSON(w http.ResponseWriter, status int, v any) { _ = sendJSON(w, status, v) }

// sendJSON is writeJSON that says whether the body was written.
func sendJSON(w http.ResponseWriter, status int, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		data = []byte(`{"error":{"message":"internal error encoding the response","type":"server_error","param":null,"code":null}}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, err = w.Write(append(data, '\n'))
	return err
}

func errInvalid(param, format string, args ...any) *apiError {
	return &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: param,
		Code: "invalid_value", Message: fmt.Sprintf(format, args...)}
}

func errUnauthorized(msg string) *apiError {
	return &apiError{Status: http.StatusUnauthorized, Type: typeInvalidRequest, Code: "invalid_api_key", Message: msg}
}

func errQueueFull(retryAfter time.Duration) *apiError {
	return &apiError{Status: http.StatusTooManyRequests, Type: typeRateLimit, Code: "queue_full",
		Message: "The job queue is full; retry later.", RetryAfter: retryAfter}
}

// errModelUnavailable: a worker announced the model recently, but none has it
// ready now; 503, so clients retry while it comes back.
func errModelUnavailable(model string) *apiError {
	return &apiError{Status: http.StatusServiceUnavailable, Type: typeServer, Param: "model", Code: schemas.CodeModelNotAvailable,
		Message: fmt.Sprintf("No ready worker serves the model %q.", model)}
}

// errModelNotFound: no worker announced the model within the grace period; 404,
// which clients do not retry.
func errModelNotFound(model string) *apiError {
	return &apiError{Status: http.StatusNotFound, Type: typeInvalidRequest, Param: "model", Code: "model_not_found",
		Message: fmt.Sprintf("The model %q does not exist: no worker serves it (GET /v1/models lists those that do).", model)}
}

func errTimeout() *apiError {
	return &apiError{Status: http.StatusGatewayTimeout, Type: typeTimeout, Code: schemas.CodeDeadlineExceeded,
		Message: "The request did not finish before its deadline."}
}

func errUnavailable(msg string) *apiError {
	return &apiError{Status: http.StatusServiceUnavailable, Type: typeServer, Code: "bus_unavailable", Message: msg}
}

func errInternal(msg string) *apiError {
	return &apiError{Status: http.StatusInternalServerError, Type: typeServer, Code: "internal_error", Message: msg}
}

// paramMap turns a job's JSON path back into the OpenAI request field the client
// wrote; each endpoint knows which of its fields became which job field.
type paramMap struct {
	maxTokens  string // "max_tokens" or "max_completion_tokens"
	stopString bool   // stop was a string: "$.stop[0]" is "stop"
	prompt     string // completions: "prompt" or "prompt[0]"
	user       bool   // metadata carries the user field
	metadata   bool   // metadata carries the client's metadata field
}

// param maps one violation path ("$.messages[1].content") to an OpenAI param
// ("messages[1].content"). ok is false for job fields the client cannot set:
// such a violation is the gateway's fault, not the client's.
func (m paramMap) param(path string) (string, bool) {
	p := strings.TrimPrefix(strings.TrimPrefix(path, "$"), ".")
	head := p
	if i := strings.IndexAny(p, ".["); i >= 0 {
		head = p[:i]
	}
	switch head {
	case "model", "messages", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
		"presence_penalty", "frequency_penalty", "logit_bias", "tools", "tool_choice", "parallel_tool_calls":
		return p, true
	case "max_tokens":
		if m.maxTokens != "" {
			return m.maxTokens, true
		}
		return "max_tokens", true
	case "stop":
		if m.stopString {
			return "stop", true
		}
		return p, true
	case "prompt":
		if m.prompt != "" {
			return m.prompt, true
		}
		return "prompt", true
	case "json_schema":
		return "response_format.json_schema.schema", true
	case "metadata":
		if m.user && (p == "metadata.user" || !m.metadata) {
			return "user", true
		}
		if m.metadata {
			return p, true
		}
	case "":
		// The document as a whole, e.g. neither or both of prompt and messages.
		return "", true
	}
	return "", false
}

// fromValidation answers a job the schema refused: 400 naming the field when the
// client's input caused it, 500 when the gateway built a bad job.
func fromValidation(verr *schemas.ValidationError, m paramMap) *apiError {
	var (
		param    string
		reasons  []string
		clientOK bool
	)
	for _, v := range verr.Violations {
		p, ok := m.param(v.Path)
		if !ok {
			continue
		}
		clientOK = true
		name := p
		if name == "" {
			name = "request"
		}
		reasons = append(reasons, fmt.Sprintf("'%s': %s", name, v.Reason))
		// The most specific field is the useful one: a document-level "oneOf"
		// accompanies the field that broke it.
		if param == "" && p != "" {
			param = p
		}
	}
	if !clientOK {
		return errInternal("the gateway built an invalid job: " + verr.Error())
	}
	return &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: param, Code: "invalid_value",
		Message: "Invalid request: " + strings.Join(reasons, "; ")}
}

// fromSubmit maps a bus submit error to an HTTP answer.
func fromSubmit(err error, m paramMap, retryAfter time.Duration) *apiError {
	var verr *schemas.ValidationError
	switch {
	case errors.As(err, &verr):
		return fromValidation(verr, m)
	case errors.Is(err, bus.ErrQueueFull):
		return errQueueFull(retryAfter)
	case errors.Is(err, bus.ErrJobTooLarge):
		return &apiError{Status: http.StatusRequestEntityTooLarge, Type: typeInvalidRequest, Code: "request_too_large",
			Message: "The request is too large for the job queue."}
	case errors.Is(err, bus.ErrNoStream), errors.Is(err, bus.ErrNotConnected):
		return errUnavailable("The job queue is unavailable; retry later.")
	case errors.Is(err, bus.ErrUnavailable):
		// The store failed or did not answer in time: a 500 said "our bug"
		// and no client retried (red team round 22: a store broken by
		// descriptor exhaustion answered every submit 500 internal_error).
		e := errUnavailable("The job queue did not take the job; retry later.")
		e.RetryAfter = retryAfter
		return e
	case errors.Is(err, bus.ErrModelCheck):
		return errUnavailable("The models bucket is unavailable; retry later.")
	case errors.Is(err, bus.ErrModelNotServed):
		// Submit's own model check disagrees with the gateway's, which saw a ready
		// worker with the model just before: announced soon, or its entry was
		// tampered with. Either way the model is expected, so retryable, as a
		// model whose workers are away.
		return &apiError{Status: http.StatusServiceUnavailable, Type: typeServer, Param: "model", Code: schemas.CodeModelNotAvailable,
			Message: "No worker has announced the model lately; retry later."}
	}
	return errInternal("Submitting the job failed.")
}

// fromResult maps a terminal record that is not a completion to an HTTP answer.
func fromResult(res *schemas.ResultMsg) *apiError {
	code, msg := "", ""
	if res.Error != nil {
		code, msg = res.Error.Code, res.Error.Message
	}
	switch res.Status {
	case schemas.StatusExpired:
		e := errTimeout()
		if msg != "" {
			e.Message = msg
		}
		return e
	case schemas.StatusCancelled:
		if msg == "" {
			msg = "The job was cancelled."
		}
		return &apiError{Status: http.StatusInternalServerError, Type: typeServer, Code: schemas.CodeCancelled, Message: msg}
	}
	if msg == "" {
		msg = "The job failed."
	}
	return answerFor(code, msg)
}

// errStreamDiverged ends a stream whose client holds text that is not the start of
// the job's result (an attempt that had to start over generated differently). The
// job's whole text stays available by its id.
func errStreamDiverged(jobID string) *apiError {
	return &apiError{Status: http.StatusBadGateway, Type: typeServer, Code: "stream_diverged",
		Message: "The job's result does not continue the text streamed so far (a retry generated different text, or streamed events were lost and cannot be repaired); fetch the whole result with `mlx-serving result " + jobID + "`."}
}

// fail answers with an OpenAI error and counts the refusal.
func (g *Gateway) fail(w http.ResponseWriter, endpoint string, e *apiError) {
	g.obs.ErrorAnswered(e.Code)
	if e.Status >= 500 {
		g.log.Warn().Str("endpoint", endpoint).Int("status", e.Status).Str("code", e.Code).Msg(e.Message)
	}
	writeError(w, e)
}
