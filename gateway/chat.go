package gateway

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// chatRequest is POST /v1/chat/completions.
type chatRequest struct {
	samplingParams
	Messages            []chatMessage `json:"messages"`
	MaxCompletionTokens *int          `json:"max_completion_tokens"`
	Logprobs            *bool         `json:"logprobs"`
	TopLogprobs         *int          `json:"top_logprobs"`
	// Metadata are the client's labels; the job carries them (echoed in logs).
	Metadata map[string]string `json:"metadata"`
	// Tools the model may call (tools.go).
	Tools             []chatTool      `json:"tools"`
	ToolChoice        json.RawMessage `json:"tool_choice"`
	ParallelToolCalls *bool           `json:"parallel_tool_calls"`

	parseCalls bool // the answer is read for tool calls
}

type chatMessage struct {
	Role       string          `json:"role"`
	Content    json.RawMessage `json:"content"`
	ToolCalls  []chatToolCall  `json:"tool_calls"`
	ToolCallID *string         `json:"tool_call_id"`
}

// contentPart is one element of an array-valued message content.
type contentPart struct {
	Type string `json:"type"`
	Text string `json:"text"`
}

func (g *Gateway) handleChat(w http.ResponseWriter, r *http.Request) {
	serve[chatRequest](g, w, r, endpointChat, chatFields, chatFormat{})
}

// format shapes the answer: read for tool calls when the request offers tools.
func (req *chatRequest) format(f format) format {
	if req.parseCalls {
		return chatFormat{calls: true}
	}
	return f
}

func (req *chatRequest) toJob(defaultModel string) (*schemas.JobRequest, paramMap, *apiError) {
	job := &schemas.JobRequest{}
	pm := paramMap{maxTokens: "max_tokens"}
	if req.MaxCompletionTokens != nil {
		// The newer name wins: it is what current clients send.
		req.MaxTokens = req.MaxCompletionTokens
		pm.maxTokens = "max_completion_tokens"
	}
	if aerr := req.apply(job, &pm, defaultModel); aerr != nil {
		return nil, pm, aerr
	}
	if len(req.Metadata) > 0 {
		if aerr := checkReservedMetadata(req.Metadata); aerr != nil {
			return nil, pm, aerr
		}
		md := make(map[string]string, len(req.Metadata)+1)
		for k, v := range req.Metadata {
			md[k] = v
		}
		if u, ok := job.Metadata["user"]; ok {
			if v, both := md["user"]; both && v != u {
				return nil, pm, errInvalid("metadata.user", "'metadata.user' differs from 'user'; send one of them.")
			}
			md["user"] = u
		}
		job.Metadata, pm.metadata = md, true
	}
	if req.TopLogprobs != nil {
		if aerr := checkTopLogprobs(*req.TopLogprobs, "top_logprobs"); aerr != nil {
			return nil, pm, aerr
		}
	}
	if req.Logprobs != nil && *req.Logprobs {
		top := 0
		if req.TopLogprobs != nil {
			top = *req.TopLogprobs
		}
		job.Logprobs = &top
	} else if req.TopLogprobs != nil && *req.TopLogprobs > 0 {
		return nil, pm, errInvalid("top_logprobs", "'top_logprobs' needs 'logprobs' set to true.")
	}
	if len(req.Messages) == 0 {
		return nil, pm, errInvalid("messages", "'messages' must hold at least one message.")
	}
	job.Messages = make([]schemas.Message, len(req.Messages))
	for i, m := range req.Messages {
		text, aerr := messageText(m.Content, fmt.Sprintf("messages[%d].content", i))
		if aerr != nil {
			return nil, pm, aerr
		}
		role := m.Role
		if role == "developer" {
			// OpenAI's newer name for the system role.
			role = "system"
		}
		job.Messages[i] = schemas.Message{Role: role, Content: text}
		if aerr := messageTools(m, &job.Messages[i], i); aerr != nil {
			return nil, pm, aerr
		}
	}
	parse, aerr := req.applyTools(job)
	if aerr != nil {
		return nil, pm, aerr
	}
	req.parseCalls = parse
	return job, pm, nil
}

// checkReservedMetadata refuses client metadata keys with the reserved prefix
// (schemas.ReservedMetadataPrefix): the dispatcher reads those as operator
// instructions — mlx_attempt_base numbers the job's attempts — so only
// operator tools (replay) may set them. Passed through, a client could number
// its job past the schemas' last attempt. The first such key in sorted order
// is named, so the answer does not depend on map order.
func checkReservedMetadata(md map[string]string) *apiError {
	for _, k := range slices.Sorted(maps.Keys(md)) {
		if strings.HasPrefix(k, schemas.ReservedMetadataPrefix) {
			return errInvalid("metadata."+k, "Metadata keys starting with %q are reserved for the service; rename 'metadata.%s'.", schemas.ReservedMetadataPrefix, k)
		}
	}
	return nil
}

// messageText flattens a content that is a string, null or an array of text parts.
func messageText(raw json.RawMessage, param string) (string, *apiError) {
	s := strings.TrimSpace(string(raw))
	if s == "" || s == "null" {
		return "", nil
	}
	var text string
	if err := json.Unmarshal(raw, &text); err == nil {
		return text, nil
	}
	var parts []contentPart
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: param, Code: "invalid_type",
			Message: fmt.Sprintf("Invalid type for '%s': expected a string or an array of content parts.", param)}
	}
	var b strings.Builder
	for i, p := range parts {
		if p.Type != "text" {
			return "", errInvalid(fmt.Sprintf("%s[%d].type", param, i), "Only text content parts are supported, not %q.", p.Type)
		}
		b.WriteString(p.Text)
	}
	return b.String(), nil
}

// chatFormat shapes chat.completion bodies and chat.completion.chunk events. With
// calls set the text is read for tool calls: each choice streams through its own
// parser (choice), a whole body is parsed at once.
type chatFormat struct {
	calls  bool
	parser *toolParser
}

type chatCompletion struct {
	ID      string       `json:"id"`
	Object  string       `json:"object"`
	Created int64        `json:"created"`
	Model   string       `json:"model"`
	Choices []chatChoice `json:"choices"`
	Usage   usage        `json:"usage"`
}

type chatChoice struct {
	Index        int             `json:"index"`
	Message      chatOutMessage  `json:"message"`
	Logprobs     json.RawMessage `json:"logprobs"`
	FinishReason string          `json:"finish_reason"`
}

type chatOutMessage struct {
	Role      string         `json:"role"`
	Content   *string        `json:"content"` // null when the answer is tool calls only
	ToolCalls []chatToolCall `json:"tool_calls,omitempty"`
}

type chatChunk struct {
	ID      string            `json:"id"`
	Object  string            `json:"object"`
	Created int64             `json:"created"`
	Model   string            `json:"model"`
	Choices []chatChunkChoice `json:"choices"`
	Usage   any               `json:"usage,omitempty"`
}

type chatChunkChoice struct {
	Index        int             `json:"index"`
	Delta        chatDelta       `json:"delta"`
	Logprobs     json.RawMessage `json:"logprobs"`
	FinishReason *string         `json:"finish_reason"`
}

type chatDelta struct {
	Role      string          `json:"role,omitempty"`
	Content   *string         `json:"content,omitempty"`
	ToolCalls []toolCallDelta `json:"tool_calls,omitempty"`
}

func (chatFormat) idPrefix() string { return "chatcmpl-" }

func (f chatFormat) body(m meta, text, finish string, u usage, lp *logprobs) any {
	msg := chatOutMessage{Role: "assistant", Content: &text}
	if f.calls {
		msg.Content, msg.ToolCalls = parseToolText(text)
		finish = toolFinish(finish, len(msg.ToolCalls))
	}
	return chatCompletion{
		ID: m.id, Object: "chat.completion", Created: m.created, Model: m.model,
		Choices: []chatChoice{{Index: 0, Message: msg, Logprobs: lp.chatJSON(), FinishReason: finish}},
		Usage:   u,
	}
}

// choice returns the format one choice streams with: its own call parser.
func (f chatFormat) choice() format {
	if f.calls {
		f.parser = &toolParser{}
	}
	return f
}

func (f chatFormat) chunk(m meta, d chatDelta, finish *string) chatChunk {
	c := chatChunk{ID: m.id, Object: "chat.completion.chunk", Created: m.created, Model: m.model,
		Choices: []chatChunkChoice{{Index: 0, Delta: d, Logprobs: jsonNull, FinishReason: finish}}}
	if m.includeUsage {
		c.Usage = jsonNull
	}
	return c
}

func (f chatFormat) first(m meta) any {
	empty := ""
	return f.chunk(m, chatDelta{Role: "assistant", Content: &empty}, nil)
}

func (f chatFormat) delta(m meta, text string, lp *logprobs) any {
	if p := f.parser; p != nil {
		if lp != nil {
			p.lpOn = true
			p.lpPending = append(p.lpPending, lp.entries...)
		}
		content, calls := p.feed(text)
		if c := f.callDelta(m, content, calls); c != nil {
			return *c
		}
		return nil
	}
	c := f.chunk(m, chatDelta{Content: &text}, nil)
	c.Choices[0].Logprobs = lp.chatJSON()
	return c
}

// callDelta is the chunk for what the parser let out, nil when nothing. It carries
// the logprobs of the tokens held back until now.
func (f chatFormat) callDelta(m meta, content string, calls []toolCallDelta) *chatChunk {
	if content == "" && len(calls) == 0 {
		return nil
	}
	d := chatDelta{ToolCalls: calls}
	if content != "" {
		d.Content = &content
	}
	c := f.chunk(m, d, nil)
	f.takeLogprobs(&c)
	return &c
}

// takeLogprobs moves the held logprobs entries into c.
func (f chatFormat) takeLogprobs(c *chatChunk) {
	if p := f.parser; p != nil && p.lpOn {
		c.Choices[0].Logprobs = (&logprobs{entries: p.lpPending}).chatJSON()
		p.lpPending = nil
	}
}

func (f chatFormat) final(m meta, finish string) any {
	if f.parser == nil {
		return f.chunk(m, chatDelta{}, &finish)
	}
	content, calls := f.parser.flush()
	rest := f.callDelta(m, content, calls)
	finish = toolFinish(finish, len(f.parser.calls))
	last := f.chunk(m, chatDelta{}, &finish)
	if rest != nil {
		return events{*rest, last}
	}
	if len(f.parser.lpPending) > 0 {
		f.takeLogprobs(&last)
	}
	return last
}

func (chatFormat) usage(m meta, u usage) any {
	return chatChunk{ID: m.id, Object: "chat.completion.chunk", Created: m.created, Model: m.model,
		Choices: []chatChunkChoice{}, Usage: u}
}
