package schemas

import (
	"encoding/json"
	"time"
)

// Message types on the bus. Each names a schema file in this folder.
const (
	Job             Type = "job"              // a generation job, published by producers to JOBS
	TokenEvent      Type = "token_event"      // one text delta on the job's reply subject (core NATS)
	Result          Type = "result"           // the terminal record: last event on the reply subject and the RESULTS record
	Cancel          Type = "cancel"           // a cancel request on mlx.cancel.<tenant>.<job-id> (and forwarded on mlx.worker.<id>.cancel)
	Heartbeat       Type = "heartbeat"        // a worker's entry in the worker registry KV bucket
	Assignment      Type = "assignment"       // a batch the dispatcher offers a worker on mlx.worker.<id>.assign
	AssignmentReply Type = "assignment_reply" // the worker's answer to an assignment
	AttemptReport   Type = "attempt_report"   // a worker's report of an attempt that failed but may be retried
	DLQRecord       Type = "dlq_record"       // a job that ran out of attempts, in the DLQ stream
	FinishReply     Type = "finish_reply"     // a dispatcher's answer to a worker's terminal hand-over on mlx.worker.<id>.done
)

// Priority levels; each is a subject token under mlx.jobs.
const (
	PriorityHigh   = "high"
	PriorityNormal = "normal"
	PriorityLow    = "low"
)

// Priorities lists the levels from highest to lowest; index i is the dispatcher's
// queue i. Adding a level touches two files: this one (the constant, this list,
// NumPriorities, PriorityWeights) and job.json's "priority" enum (a test keeps
// the two equal). Everything else is sized by NumPriorities or ranges over
// Priorities.
var Priorities = []string{PriorityHigh, PriorityNormal, PriorityLow}

// PriorityWeights are the dispatchers' default weights of Priorities for
// weighted fair selection: over a busy stretch high gets 4/7 of the picks, low
// 1/7 and is never starved. A level left without a weight is 0, which dispatcher
// Config refuses ("Weights must all be positive"), so no dispatcher starts.
var PriorityWeights = [NumPriorities]int{4, 2, 1}

// NumPriorities is len(Priorities) as a constant, for arrays indexed by priority.
const NumPriorities = 3

// Message is one chat message. An assistant message may carry the calls it made,
// a tool message the id of the call it answers.
type Message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	ToolCalls  []ToolCall `json:"tool_calls,omitempty"`
	ToolCallID string     `json:"tool_call_id,omitempty"`
}

// ToolCall is one call an assistant message made, in OpenAI's shape.
type ToolCall struct {
	ID       string           `json:"id"`
	Type     string           `json:"type"` // "function"
	Function ToolCallFunction `json:"function"`
}

// ToolCallFunction names the function called and its arguments, a JSON string.
type ToolCallFunction struct {
	Name      string `json:"name"`
	Arguments string `json:"arguments"`
}

// Tool is a function the model may call (OpenAI's tools entry).
type Tool struct {
	Type     string       `json:"type"` // "function"
	Function ToolFunction `json:"function"`
}

// ToolFunction defines a function: its arguments validate against Parameters.
type ToolFunction struct {
	Name        string         `json:"name"`
	Description string         `json:"description,omitempty"`
	Parameters  map[string]any `json:"parameters,omitempty"`
}

// Tool choice modes; a ToolChoice with Function set names one function instead.
const (
	ToolChoiceAuto     = "auto"
	ToolChoiceNone     = "none"
	ToolChoiceRequired = "required"
)

// ToolChoice is OpenAI's tool_choice: a mode ("auto", "none", "required") encoded as
// a JSON string, or one function, encoded {"type":"function","function":{"name":...}}.
type ToolChoice struct {
	Mode     string // set when Function is empty
	Function string
}

type toolChoiceObject struct {
	Type     string `json:"type"`
	Function struct {
		Name string `json:"name"`
	} `json:"function"`
}

// MarshalJSON writes the mode as a string, a function as OpenAI's object.
func (c ToolChoice) MarshalJSON() ([]byte, error) {
	if c.Function == "" {
		return json.Marshal(c.Mode)
	}
	o := toolChoiceObject{Type: "function"}
	o.Function.Name = c.Function
	return json.Marshal(o)
}

// UnmarshalJSON reads either encoding.
func (c *ToolChoice) UnmarshalJSON(data []byte) error {
	var mode string
	if err := json.Unmarshal(data, &mode); err == nil {
		*c = ToolChoice{Mode: mode}
		return nil
	}
	var o toolChoiceObject
	if err := json.Unmarshal(data, &o); err != nil {
		return err
	}
	*c = ToolChoice{Function: o.Function.Name}
	return nil
}

// Sampling is how a generation picks its tokens and when it stops: the fields a
// job and the runtime's generate params share, with the same JSON names. Both
// embed it, so encoding/json flattens it into their objects (the schemas do not
// see it) and the worker hands it on whole.
type Sampling struct {
	Temperature       *float64           `json:"temperature,omitempty"`
	TopP              *float64           `json:"top_p,omitempty"`
	TopK              *int               `json:"top_k,omitempty"`
	MinP              *float64           `json:"min_p,omitempty"`
	RepetitionPenalty *float64           `json:"repetition_penalty,omitempty"`
	PresencePenalty   *float64           `json:"presence_penalty,omitempty"`
	FrequencyPenalty  *float64           `json:"frequency_penalty,omitempty"`
	LogitBias         map[string]float64 `json:"logit_bias,omitempty"` // token id (decimal) -> bias
	Logprobs          *int               `json:"logprobs,omitempty"`   // nil: none; n: each token's logprob and n alternatives
	Seed              *int64             `json:"seed,omitempty"`
	Stop              []string           `json:"stop,omitempty"`
}

// JobRequest is a generation job (schema "job"). Exactly one of Prompt and Messages is set.
type JobRequest struct {
	ID        string    `json:"id"`
	Model     string    `json:"model"`
	Prompt    string    `json:"prompt,omitempty"`
	Messages  []Message `json:"messages,omitempty"`
	MaxTokens int       `json:"max_tokens,omitempty"`
	Sampling
	JSONSchema        map[string]any    `json:"json_schema,omitempty"`
	Tools             []Tool            `json:"tools,omitempty"`
	ToolChoice        *ToolChoice       `json:"tool_choice,omitempty"`
	ParallelToolCalls *bool             `json:"parallel_tool_calls,omitempty"`
	Priority          string            `json:"priority,omitempty"`
	Deadline          *time.Time        `json:"deadline,omitempty"`
	Tenant            string            `json:"tenant,omitempty"`
	ReplyTo           string            `json:"reply_to"`
	CreatedAt         *time.Time        `json:"created_at,omitempty"`
	Metadata          map[string]string `json:"metadata,omitempty"`
}

// Usage counts tokens as the model's tokenizer counts them.
type Usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
	// CachedTokens of PromptTokens came from the runtime's prompt cache.
	CachedTokens int `json:"cached_tokens,omitempty"`
}

// Timings are measured by the runtime and the worker for one attempt.
type Timings struct {
	QueuedMs     float64 `json:"queued_ms,omitempty"`
	TTFTMs       float64 `json:"ttft_ms,omitempty"`
	TotalMs      float64 `json:"total_ms,omitempty"`
	TokensPerSec float64 `json:"tokens_per_s,omitempty"`
}

// TokenEventMsg is one text delta (schema "token_event"). Seq counts from 0 within
// an attempt; a caller detects gaps and restarts from (Attempt, Seq).
type TokenEventMsg struct {
	Type    string `json:"type"` // always "token"
	JobID   string `json:"job_id"`
	Attempt int    `json:"attempt"`
	Seq     int    `json:"seq"`
	Delta   string `json:"delta"`
	Tokens  int    `json:"tokens"` // completion tokens so far in this job
	// Offset is where Delta starts in the job's text, in bytes. A resumed attempt
	// starts at the length of the text already sent; one that had to start over
	// starts at 0; bus.JobStream swallows what it regenerates and says what to
	// take back where it differs (bus.Drop).
	Offset int `json:"offset,omitempty"`
	// Logprobs, when the job asked for them: the tokens whose text starts in Delta.
	Logprobs []TokenLogprob `json:"logprobs,omitempty"`
}

// TokenLogprob is one generated token's log probability and the most likely
// tokens at its position: OpenAI's chat logprobs entry, forwarded as is.
type TokenLogprob struct {
	Token       string       `json:"token"`
	Logprob     float64      `json:"logprob"` // -9999 stands for minus infinity
	Bytes       []int        `json:"bytes"`
	TopLogprobs []TopLogprob `json:"top_logprobs"`
}

// TopLogprob is one alternative at a position.
type TopLogprob struct {
	Token   string  `json:"token"`
	Logprob float64 `json:"logprob"`
	Bytes   []int   `json:"bytes"`
}

// Terminal statuses of a job.
const (
	StatusCompleted = "completed"
	StatusFailed    = "failed"
	StatusCancelled = "cancelled"
	StatusExpired   = "expired"
)

// ErrorInfo is a stable error code with a message.
type ErrorInfo struct {
	Code      string `json:"code"`
	Message   string `json:"message"`
	Retryable bool   `json:"retryable,omitempty"`
}

// ResultMsg is the terminal record of a job (schema "result"): the last event on its
// reply subject and the one record in RESULTS under mlx.results.<tenant>.<job-id>.
type ResultMsg struct {
	Type         string     `json:"type"` // always "result"
	JobID        string     `json:"job_id"`
	Attempt      int        `json:"attempt"`
	Seq          int        `json:"seq"` // the seq after the last token event of this attempt
	Status       string     `json:"status"`
	FinishReason string     `json:"finish_reason,omitempty"` // stop | length | cancelled, when the model ran
	Text         string     `json:"text"`                    // the whole generated text, across attempts
	Usage        Usage      `json:"usage"`
	Error        *ErrorInfo `json:"error,omitempty"`
	Model        string     `json:"model,omitempty"`
	Tenant       string     `json:"tenant,omitempty"`
	WorkerID     string     `json:"worker_id,omitempty"`
	Timings      *Timings   `json:"timings,omitempty"`
	FinishedAt   time.Time  `json:"finished_at"`
	// Logprobs of the final attempt's tokens, bounded (MaxResultLogprobs); the
	// token events carry every entry.
	Logprobs          []TokenLogprob `json:"logprobs,omitempty"`
	LogprobsTruncated bool           `json:"logprobs_truncated,omitempty"`
}

// CancelMsg asks for a job to be cancelled (schema "cancel").
type CancelMsg struct {
	JobID  string `json:"job_id"`
	Reason string `json:"reason,omitempty"`
	Tenant string `json:"tenant,omitempty"`
	// Attempt, when set, limits the cancel to that attempt (cancel.json).
	Attempt int `json:"attempt,omitempty"`
	// Retry: stop the attempt and report it for retry, not end the job.
	Retry       bool      `json:"retry,omitempty"`
	RequestedAt time.Time `json:"requested_at"`
}

// Worker states announced in the heartbeat.
const (
	WorkerReady       = "ready"
	WorkerDraining    = "draining"
	WorkerUnavailable = "unavailable"
)

// HeartbeatMsg is a worker's entry in the registry bucket (schema "heartbeat").
type HeartbeatMsg struct {
	WorkerID    string    `json:"worker_id"`
	Hostname    string    `json:"hostname"`
	Platform    string    `json:"platform"`
	Chip        string    `json:"chip,omitempty"`
	MemoryBytes int64     `json:"memory_bytes"`
	Models      []string  `json:"models"`
	Slots       int       `json:"slots"`
	InFlight    int       `json:"in_flight"`
	State       string    `json:"state"`
	Version     string    `json:"version,omitempty"`
	StartedAt   time.Time `json:"started_at"`
	UpdatedAt   time.Time `json:"updated_at"`
	// PromptCache is the runtime's prompt cache as its last health answer
	// stated it; nil when the runtime reports none.
	PromptCache *PromptCacheStats `json:"prompt_cache,omitempty"`
	// Prefixes are routing hints: chain hashes (internal/prefix) of prompts
	// the worker's current runtime ran, per model, most recent first; at most
	// MaxHeartbeatPrefixes in all.
	Prefixes []ModelPrefixes `json:"prefixes,omitempty"`
}

// MaxHeartbeatPrefixes bounds the hashes of one heartbeat over all models:
// about 10 KB of JSON, far below NATS' payload limit (1 MB by default) and
// cheap to put every second.
const MaxHeartbeatPrefixes = 512

// ModelPrefixes are one model's prefix hashes in a heartbeat.
type ModelPrefixes struct {
	Model  string   `json:"model"`
	Hashes []string `json:"hashes"`
}

// Resume lets a job continue on a new worker where an earlier attempt stopped: the
// worker appends Text to the prompt as already generated (it is not sent again)
// and generates at most the job's max_tokens minus CompletionTokens. Event seq
// numbers restart at 0 with each attempt; callers tell attempts apart by number.
type Resume struct {
	Text             string `json:"text"`
	CompletionTokens int    `json:"completion_tokens"`
}

// AssignedJob is one job in an assignment.
type AssignedJob struct {
	Job     JobRequest `json:"job"`
	Attempt int        `json:"attempt"`
	Resume  *Resume    `json:"resume,omitempty"`
	// Traceparent is the W3C trace context the worker's span continues; one per
	// job, since a batch's jobs belong to different traces. Empty: not traced.
	Traceparent string `json:"traceparent,omitempty"`
	// Placement is the dispatcher's signed proof that it placed this attempt
	// on this worker (internal/placement): with it, any dispatcher holding
	// the key stores the job's terminal record when the one that placed it
	// is gone (subjects.Adopt). Empty: the record goes only to its dispatcher.
	Placement string `json:"placement,omitempty"`
}

// AssignmentMsg is a batch offered to one worker (schema "assignment").
type AssignmentMsg struct {
	BatchID      string `json:"batch_id"`
	DispatcherID string `json:"dispatcher_id"`
	Model        string `json:"model"`
	// WorkerStartedAt names the worker process the batch is for: the
	// started_at of the heartbeats the dispatcher follows. A process of the
	// same worker id that started at another time does not answer it
	// (worker/assign.go). Absent: any process of the id.
	WorkerStartedAt *time.Time    `json:"worker_started_at,omitempty"`
	Jobs            []AssignedJob `json:"jobs"`
}

// Assignment reply statuses.
const (
	AssignAccepted = "accepted"
	AssignFull     = "full"
	AssignRejected = "rejected" // draining, unavailable, or model unknown
)

// AssignmentReplyMsg answers an assignment (schema "assignment_reply"). A worker
// either takes the whole batch or none of it.
type AssignmentReplyMsg struct {
	BatchID   string     `json:"batch_id"`
	WorkerID  string     `json:"worker_id"`
	Status    string     `json:"status"`
	FreeSlots int        `json:"free_slots"`
	Error     *ErrorInfo `json:"error,omitempty"`
}

// AttemptReportMsg tells dispatchers that an attempt ended without a terminal result
// and may be retried (schema "attempt_report"), on mlx.worker.<worker-id>.attempt.
type AttemptReportMsg struct {
	JobID            string    `json:"job_id"`
	Tenant           string    `json:"tenant,omitempty"`
	Attempt          int       `json:"attempt"`
	WorkerID         string    `json:"worker_id"`
	Error            ErrorInfo `json:"error"`
	Text             string    `json:"text"` // everything the caller has received so far, across attempts
	Seq              int       `json:"seq"`  // the next seq the caller expects
	CompletionTokens int       `json:"completion_tokens"`
	ReportedAt       time.Time `json:"reported_at"`
}

// DLQRecordMsg is a dead-lettered job (schema "dlq_record"), on
// mlx.dlq.<tenant>.<job-id>; or a message on JOBS that could not be a job, with
// RawSubject and RawData instead of Job, on mlx.dlq._raw.<jobs-seq>.
type DLQRecordMsg struct {
	Job          JobRequest `json:"job,omitzero"`
	Reason       string     `json:"reason"`
	Attempts     int        `json:"attempts"`
	LastError    ErrorInfo  `json:"last_error"`
	DeadAt       time.Time  `json:"dead_at"`
	DispatcherID string     `json:"dispatcher_id,omitempty"`
	RawSubject   string     `json:"raw_subject,omitempty"`
	RawData      string     `json:"raw_data,omitempty"` // base64 of the message body
}

// Answers of a dispatcher to a worker's terminal hand-over (FinishReplyMsg.Status).
const (
	FinishStored  = "stored"  // the record is in RESULTS: JetStream acknowledged it
	FinishExists  = "exists"  // another record was there first; send nothing more
	FinishUnknown = "unknown" // that attempt is not this dispatcher's on that worker
	FinishBusy    = "busy"    // not read: too many of this worker's requests waiting; try again
)

// FinishReplyMsg answers a worker that handed over a terminal record (schema
// "finish_reply").
type FinishReplyMsg struct {
	JobID  string `json:"job_id,omitempty"` // absent when busy, or unknown to a request that is no valid record
	Tenant string `json:"tenant,omitempty"`
	Status string `json:"status"`
}
