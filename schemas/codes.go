package schemas

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"sort"
)

// Stable error codes: ErrorInfo.Code on the bus and RPCErrorData.Code on the
// runtime pipe. codes/errors.json is the source of truth (meaning, retryable, the
// JSON-RPC number); these constants only name its entries for Go, and
// TestCodesMatchFile fails when the two differ. The Python runtime reads the same
// file, so a code added there exists on both sides; the gateway's mapping test
// fails until the new code is mapped to an HTTP answer.
const (
	// Runtime (JSON-RPC data.code); the worker passes them on in results.
	CodeParseError       = "parse_error"
	CodeInvalidRequest   = "invalid_request" // also the worker and dispatcher: the job fails its schema
	CodeMethodNotFound   = "method_not_found"
	CodeInvalidParams    = "invalid_params"
	CodeModelNotLoaded   = "model_not_loaded" // also the worker's assignment reply
	CodeModelLoadFailed  = "model_load_failed"
	CodeTooManyModels    = "too_many_models"
	CodeContextExceeded  = "context_exceeded"
	CodeGenerationFailed = "generation_failed"
	CodeOutOfMemory      = "out_of_memory" // retryable
	CodeDuplicateRequest = "duplicate_request"
	CodeInvalidSchema    = "invalid_schema"
	CodeShuttingDown     = "shutting_down" // retryable
	CodeRuntimeBusy      = "runtime_busy"  // retryable
	CodeBatchFailed      = "batch_failed"  // retryable
	CodeRuntimeError     = "runtime_error" // an unknown JSON-RPC number without data.code

	// Worker.
	CodeInvalidMessage   = "invalid_message"
	CodeRuntimeCrashed   = "runtime_crashed"     // retryable
	CodeRuntimeDown      = "runtime_unavailable" // retryable
	CodeWorkerShutdown   = "worker_shutdown"     // retryable
	CodeWorkerDraining   = "worker_draining"     // retryable
	CodeCancelled        = "cancelled"           // also the dispatcher
	CodeDeadlineExceeded = "deadline_exceeded"   // also the dispatcher
	CodeResultTooLarge   = "result_too_large"
	CodeHandOverFailed   = "handover_failed" // retryable

	// Dispatcher.
	CodeAttemptsExhausted = "attempts_exhausted"
	CodeAssignFailed      = "assign_failed"    // retryable
	CodeWorkerRestarted   = "worker_restarted" // retryable
	CodeWorkerLost        = "worker_lost"      // retryable
	CodeAttemptTimeout    = "attempt_timeout"  // retryable
	CodeRedelivered       = "redelivered"
	CodeNotAJob           = "not_a_job"
	CodeModelNotAvailable = "model_not_available"
)

// CodeInfo is one entry of codes/errors.json.
type CodeInfo struct {
	Code      string   `json:"code"`
	RPC       int      `json:"rpc,omitempty"` // JSON-RPC number; 0 for codes the runtime never sends
	Retryable bool     `json:"retryable"`
	Senders   []string `json:"senders"`
	Meaning   string   `json:"meaning"`
}

//go:embed codes/errors.json
var codesFile []byte

// codeTable is parsed once at init: a malformed file is a build defect, so it
// panics (every test of this package fails) rather than leaving codes unknown.
// rpcCodes maps a JSON-RPC number to the first code listed with it (the one a
// runtime error without data.code means: -32002 is model_load_failed, and
// too_many_models always comes with its data.code).
var codeTable, rpcCodes = func() (map[string]CodeInfo, map[int]string) {
	var f struct {
		Codes []CodeInfo `json:"codes"`
	}
	if err := json.Unmarshal(codesFile, &f); err != nil {
		panic(fmt.Sprintf("schemas: codes/errors.json: %v", err))
	}
	m := make(map[string]CodeInfo, len(f.Codes))
	rpc := map[int]string{}
	for _, c := range f.Codes {
		if _, dup := m[c.Code]; dup {
			panic("schemas: codes/errors.json lists " + c.Code + " twice")
		}
		m[c.Code] = c
		if _, seen := rpc[c.RPC]; c.RPC != 0 && !seen {
			rpc[c.RPC] = c.Code
		}
	}
	return m, rpc
}()

// Codes returns every stable error code, sorted.
func Codes() []CodeInfo {
	out := make([]CodeInfo, 0, len(codeTable))
	for _, c := range codeTable {
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Code < out[j].Code })
	return out
}

// LookupCode returns the entry of code; ok is false for a code nobody defined
// (a newer peer's, or a typo).
func LookupCode(code string) (CodeInfo, bool) {
	c, ok := codeTable[code]
	return c, ok
}

// Retryable reports whether another attempt after code may succeed. Unknown codes
// are not retryable: failing a job is safer than retrying it forever.
func Retryable(code string) bool { return codeTable[code].Retryable }
