package schemas

import "encoding/json"

// Go types of the runtime protocol (docs/runtime-protocol.md): line-delimited
// JSON-RPC 2.0 between a worker and its Python runtime. Each type names the
// schemas/runtime.*.json file it must validate against.

// Schema types of the runtime pipe.
const (
	RuntimeRequest      Type = "runtime.request"
	RuntimeResponse     Type = "runtime.response"
	RuntimeNotification Type = "runtime.notification"

	RuntimeInfoParams        Type = "runtime.info.params"
	RuntimeInfoResult        Type = "runtime.info.result"
	RuntimeHealthParams      Type = "runtime.health.params"
	RuntimeHealthResult      Type = "runtime.health.result"
	RuntimeShutdownParams    Type = "runtime.shutdown.params"
	RuntimeShutdownResult    Type = "runtime.shutdown.result"
	RuntimeModelLoadParams   Type = "runtime.model.load.params"
	RuntimeModelLoadResult   Type = "runtime.model.load.result"
	RuntimeModelUnloadParams Type = "runtime.model.unload.params"
	RuntimeModelUnloadResult Type = "runtime.model.unload.result"
	RuntimeGenerateParams    Type = "runtime.generate.params"
	RuntimeGenerateResult    Type = "runtime.generate.result"
	RuntimeGenerateChunk     Type = "runtime.generate.chunk"
	RuntimeCancelParams      Type = "runtime.cancel.params"
	RuntimeCancelResult      Type = "runtime.cancel.result"
	RuntimeTokenizeParams    Type = "runtime.tokenize.params"
	RuntimeTokenizeResult    Type = "runtime.tokenize.result"
)

// JSONRPCVersion is the only "jsonrpc" value either side sends.
const JSONRPCVersion = "2.0"

// Runtime methods and notifications.
const (
	MethodRuntimeInfo   = "runtime.info"
	MethodHealth        = "health"
	MethodShutdown      = "shutdown"
	MethodModelLoad     = "model.load"
	MethodModelUnload   = "model.unload"
	MethodGenerate      = "generate"
	MethodCancel        = "cancel"
	MethodTokenize      = "tokenize"
	NotifyGenerateChunk = "generate.chunk"
)

// JSON-RPC error codes the runtime answers with; RPCErrorData.Code carries the
// stable string code next to each (codes/errors.json lists both; see codes.go).
const (
	RPCParseError       = -32700 // parse_error
	RPCInvalidRequest   = -32600 // invalid_request
	RPCMethodNotFound   = -32601 // method_not_found
	RPCInvalidParams    = -32602 // invalid_params
	RPCModelNotLoaded   = -32001 // model_not_loaded
	RPCModelLoadFailed  = -32002 // model_load_failed (data.code too_many_models when the cap is reached)
	RPCContextExceeded  = -32003 // context_exceeded
	RPCGenerationFailed = -32004 // generation_failed
	RPCOutOfMemory      = -32005 // out_of_memory
	RPCDuplicateRequest = -32006 // duplicate_request
	RPCInvalidSchema    = -32007 // invalid_schema
	RPCShuttingDown     = -32008 // shutting_down
	RPCRuntimeBusy      = -32009 // runtime_busy
	RPCBatchFailed      = -32010 // batch_failed
)

// Finish reasons of a generate.
const (
	FinishStop      = "stop"
	FinishLength    = "length"
	FinishCancelled = "cancelled"
)

// Shutdown modes.
const (
	ShutdownDrain  = "drain"
	ShutdownCancel = "cancel"
)

// RPCRequest is the request envelope (schema "runtime.request"). The worker always
// uses integer ids.
type RPCRequest struct {
	JSONRPC string `json:"jsonrpc"`
	ID      int64  `json:"id"`
	Method  string `json:"method"`
	Params  any    `json:"params"`
}

// RPCErrorData is the "data" member of a runtime error.
type RPCErrorData struct {
	Code       string      `json:"code"`
	Violations []Violation `json:"violations,omitempty"`
}

// RPCError is the "error" member of a response (schema "runtime.response").
type RPCError struct {
	Code    int           `json:"code"`
	Message string        `json:"message"`
	Data    *RPCErrorData `json:"data,omitempty"`
}

// StableCode returns data.code, or a code derived from the JSON-RPC code when the
// runtime sent no data.
func (e *RPCError) StableCode() string {
	if e.Data != nil && e.Data.Code != "" {
		return e.Data.Code
	}
	if c, ok := rpcCodes[e.Code]; ok {
		return c // codes/errors.json: the one list of numbers and codes
	}
	return CodeRuntimeError
}

// RPCResponse is the response envelope (schema "runtime.response"): exactly one of
// Result and Error is set. ID is null when the runtime could not read the request's id.
type RPCResponse struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id"`
	Result  json.RawMessage `json:"result,omitempty"`
	Error   *RPCError       `json:"error,omitempty"`
}

// RPCNotification is the notification envelope (schema "runtime.notification").
type RPCNotification struct {
	JSONRPC string `json:"jsonrpc"`
	Method  string `json:"method"`
	Params  any    `json:"params"`
}

// EmptyParams is the params object of methods that take none.
type EmptyParams struct{}

// RuntimeMemory is the runtime's view of device memory.
type RuntimeMemory struct {
	TotalBytes  int64 `json:"total_bytes"`
	ActiveBytes int64 `json:"active_bytes"`
	PeakBytes   int64 `json:"peak_bytes"`
}

// RuntimeInfo answers runtime.info (schema "runtime.info.result").
type RuntimeInfo struct {
	RuntimeVersion string            `json:"runtime_version"`
	MLXVersion     string            `json:"mlx_version"`
	MLXLMVersion   string            `json:"mlx_lm_version"`
	PythonVersion  string            `json:"python_version"`
	Platform       string            `json:"platform"`
	Device         string            `json:"device"` // cpu | gpu
	Memory         RuntimeMemory     `json:"memory"`
	MaxBatch       int               `json:"max_batch"`
	MaxModels      int               `json:"max_models"`
	Models         []string          `json:"models"`
	PromptCache    *PromptCacheStats `json:"prompt_cache,omitempty"`
}

// HealthResult answers health (schema "runtime.health.result").
type HealthResult struct {
	OK       bool `json:"ok"`
	InFlight int  `json:"in_flight"`
	// DecodedTokens counts every row the runtime's generators decoded, one per
	// row per step, including rows no request reads any more.
	DecodedTokens int64             `json:"decoded_tokens"`
	Models        []string          `json:"models"`
	PromptCache   *PromptCacheStats `json:"prompt_cache,omitempty"`
}

// PromptCacheStats describe the runtime's prompt (KV) cache; the counters are
// cumulative since the runtime started.
type PromptCacheStats struct {
	Entries      int   `json:"entries"`
	Bytes        int64 `json:"bytes"`
	MaxBytes     int64 `json:"max_bytes"`
	Lookups      int64 `json:"lookups"`
	Hits         int64 `json:"hits"`
	HitTokens    int64 `json:"hit_tokens"`
	PromptTokens int64 `json:"prompt_tokens"`
}

// ShutdownParams asks the runtime to stop (schema "runtime.shutdown.params").
type ShutdownParams struct {
	Mode string `json:"mode,omitempty"` // drain (default) | cancel
}

// ShutdownResult answers shutdown (schema "runtime.shutdown.result"); the process
// exits 0 after sending it.
type ShutdownResult struct {
	OK        bool `json:"ok"`
	Cancelled int  `json:"cancelled"`
}

// ModelLoadParams loads a model from a path or hub id under an optional alias.
type ModelLoadParams struct {
	Model string `json:"model"`
	ID    string `json:"id,omitempty"`
}

// ModelLoadResult answers model.load.
type ModelLoadResult struct {
	ID            string  `json:"id"`
	Path          string  `json:"path"`
	ContextLength int     `json:"context_length"`
	VocabSize     int     `json:"vocab_size"`
	LoadTimeMs    float64 `json:"load_time_ms"`
}

// ModelUnloadParams unloads a model by id.
type ModelUnloadParams struct {
	ID string `json:"id"`
}

// ModelUnloadResult answers model.unload.
type ModelUnloadResult struct {
	ID       string `json:"id"`
	Unloaded bool   `json:"unloaded"`
}

// GenerateParams starts one generation (schema "runtime.generate.params").
// Exactly one of Prompt and Messages is set.
type GenerateParams struct {
	RequestID string    `json:"request_id"`
	Model     string    `json:"model"`
	Prompt    string    `json:"prompt,omitempty"`
	Messages  []Message `json:"messages,omitempty"`
	MaxTokens int       `json:"max_tokens,omitempty"`
	Sampling
	JSONSchema        map[string]any `json:"json_schema,omitempty"`
	Tools             []Tool         `json:"tools,omitempty"`
	ToolChoice        *ToolChoice    `json:"tool_choice,omitempty"`
	ParallelToolCalls *bool          `json:"parallel_tool_calls,omitempty"`
	Continuation      string         `json:"continuation,omitempty"`
	// CacheScope: the prompt-cache entries this generate may reuse and adds to
	// are its scope's only (the worker passes the job's tenant).
	CacheScope string `json:"cache_scope,omitempty"`
}

// GenerateChunk is the params of a generate.chunk notification (schema
// "runtime.generate.chunk"): one text delta of a running generate.
type GenerateChunk struct {
	RequestID string         `json:"request_id"`
	Seq       int            `json:"seq"`
	Text      string         `json:"text"`
	Tokens    int            `json:"tokens"` // completion tokens so far in this call
	Logprobs  []TokenLogprob `json:"logprobs,omitempty"`
}

// RuntimeTimings are the runtime's measurements of one generate.
type RuntimeTimings struct {
	TTFTMs       float64 `json:"ttft_ms"`
	TotalMs      float64 `json:"total_ms"`
	TokensPerSec float64 `json:"tokens_per_s"`
}

// GenerateResult answers generate (schema "runtime.generate.result").
type GenerateResult struct {
	RequestID    string         `json:"request_id"`
	FinishReason string         `json:"finish_reason"` // stop | length | cancelled
	Text         string         `json:"text"`          // the whole text of this call
	Usage        Usage          `json:"usage"`
	Timings      RuntimeTimings `json:"timings"`
	Logprobs     []TokenLogprob `json:"logprobs,omitempty"`
	// LogprobsTruncated: the runtime sent only the entries that fit a
	// result's bound (worker/logprobs.go), not every token's.
	LogprobsTruncated bool `json:"logprobs_truncated,omitempty"`
}

// CancelParams stops a running generate.
type CancelParams struct {
	RequestID string `json:"request_id"`
}

// CancelResult answers cancel; Cancelled is false when the request was unknown or
// had already finished.
type CancelResult struct {
	RequestID string `json:"request_id"`
	Cancelled bool   `json:"cancelled"`
}

// TokenizeParams tokenizes text with a loaded model's tokenizer.
type TokenizeParams struct {
	Model            string `json:"model"`
	Text             string `json:"text"`
	AddSpecialTokens *bool  `json:"add_special_tokens,omitempty"`
}

// TokenizeResult answers tokenize.
type TokenizeResult struct {
	Tokens []int `json:"tokens"`
	Count  int   `json:"count"`
}
