package schemas

import "testing"

func TestRPCErrorStableCode(t *testing.T) {
	t.Parallel()
	byNumber := map[int]string{
		RPCParseError:       CodeParseError,
		RPCInvalidRequest:   CodeInvalidRequest,
		RPCMethodNotFound:   CodeMethodNotFound,
		RPCInvalidParams:    CodeInvalidParams,
		RPCModelNotLoaded:   CodeModelNotLoaded,
		RPCModelLoadFailed:  CodeModelLoadFailed,
		RPCContextExceeded:  CodeContextExceeded,
		RPCGenerationFailed: CodeGenerationFailed,
		RPCOutOfMemory:      CodeOutOfMemory,
		RPCDuplicateRequest: CodeDuplicateRequest,
		RPCInvalidSchema:    CodeInvalidSchema,
		RPCShuttingDown:     CodeShuttingDown,
		RPCRuntimeBusy:      CodeRuntimeBusy,
		-32099:              CodeRuntimeError,
		0:                   CodeRuntimeError,
	}
	seen := map[string]bool{}
	for n, want := range byNumber {
		// Without data, and with data that carries no code, the number decides.
		for _, e := range []*RPCError{{Code: n}, {Code: n, Data: &RPCErrorData{}}} {
			if got := e.StableCode(); got != want {
				t.Errorf("RPCError{Code: %d, Data: %v}.StableCode() = %q, want %q", n, e.Data, got, want)
			}
		}
		if want != CodeRuntimeError && seen[want] {
			t.Errorf("two numbers map to %q", want)
		}
		seen[want] = true
	}
	// data.code is more specific than the number (too_many_models under model_load_failed).
	e := &RPCError{Code: RPCModelLoadFailed, Data: &RPCErrorData{Code: CodeTooManyModels}}
	if got := e.StableCode(); got != CodeTooManyModels {
		t.Errorf("StableCode() = %q, want %q", got, CodeTooManyModels)
	}
}
