package schemas

import "testing"

func TestRPCErrorStableCode(t *testing.T) {
	t.Parallel()
	byNumber := map[int]string{
		RPCParseError:       RuntimeCodeParseError,
		RPCInvalidRequest:   RuntimeCodeInvalidRequest,
		RPCMethodNotFound:   RuntimeCodeMethodNotFound,
		RPCInvalidParams:    RuntimeCodeInvalidParams,
		RPCModelNotLoaded:   RuntimeCodeModelNotLoaded,
		RPCModelLoadFailed:  RuntimeCodeModelLoadFailed,
		RPCContextExceeded:  RuntimeCodeContextExceeded,
		RPCGenerationFailed: RuntimeCodeGenerationFailed,
		RPCOutOfMemory:      RuntimeCodeOutOfMemory,
		RPCDuplicateRequest: RuntimeCodeDuplicateRequest,
		RPCInvalidSchema:    RuntimeCodeInvalidSchema,
		RPCShuttingDown:     RuntimeCodeShuttingDown,
		-32099:              "runtime_error",
		0:                   "runtime_error",
	}
	seen := map[string]bool{}
	for n, want := range byNumber {
		// Without data, and with data that carries no code, the number decides.
		for _, e := range []*RPCError{{Code: n}, {Code: n, Data: &RPCErrorData{}}} {
			if got := e.StableCode(); got != want {
				t.Errorf("RPCError{Code: %d, Data: %v}.StableCode() = %q, want %q", n, e.Data, got, want)
			}
		}
		if want != "runtime_error" && seen[want] {
			t.Errorf("two numbers map to %q", want)
		}
		seen[want] = true
	}
	// data.code is more specific than the number (too_many_models under model_load_failed).
	e := &RPCError{Code: RPCModelLoadFailed, Data: &RPCErrorData{Code: RuntimeCodeTooManyModels}}
	if got := e.StableCode(); got != RuntimeCodeTooManyModels {
		t.Errorf("StableCode() = %q, want %q", got, RuntimeCodeTooManyModels)
	}
}
