package worker

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// ErrRuntimeExited is returned by every call that was pending, or is made, after the
// runtime's stdout closed or the client was closed: the process is gone.
var ErrRuntimeExited = errors.New("worker: runtime exited")

// DefaultMaxLineBytes bounds one line from the runtime. A generate result carries the
// whole text of a long completion, so the bound is generous.
const DefaultMaxLineBytes = 16 << 20

// writeBuffer buffers request lines to the runtime. Each line is flushed at once,
// so a bigger buffer only holds memory; a longer line is written straight through.
const writeBuffer = 4 << 10

// RuntimeError is an error response from the runtime.
type RuntimeError struct {
	Method string
	Err    schemas.RPCError
}

func (e *RuntimeError) Error() string {
	return fmt.Sprintf("runtime %s: %s (%d %s)", e.Method, e.Err.Message, e.Err.Code, e.Err.StableCode())
}

// Code is the stable string code of the error (data.code).
func (e *RuntimeError) Code() string { return e.Err.StableCode() }

// RuntimeClientOptions configures a RuntimeClient.
type RuntimeClientOptions struct {
	// MaxLineBytes bounds one line read from the runtime; DefaultMaxLineBytes when 0.
	MaxLineBytes int
	Logger       zerolog.Logger
}

// RuntimeClient speaks the runtime protocol over a pair of pipes. Writes are
// serialised by one lock; one reader goroutine routes responses by id and
// generate.chunk notifications by request_id, so any number of calls and generates
// may run at once.
type RuntimeClient struct {
	log zerolog.Logger

	wmu sync.Mutex
	w   *bufio.Writer
	wc  io.Closer // closes the write side, when the writer is closable

	nextID atomic.Int64

	mu      sync.Mutex
	pending map[int64]chan *schemas.RPCResponse
	streams map[string]*chunkStream
	err     error

	done chan struct{}
}

// chunkStream is one generate's chunk hook, called by the reader goroutine
// itself: handing every chunk to the generate's goroutine cost a goroutine
// wake-up per token, which on a machine whose cores the runtime needs is taken
// from generation. The lock orders the hook against the generate's end: once
// Generate returns, the hook is not running and never runs again.
type chunkStream struct {
	mu     sync.Mutex
	hook   func(*schemas.GenerateChunk)
	closed bool
}

// deliver calls the hook unless the generate has ended.
func (s *chunkStream) deliver(c *schemas.GenerateChunk) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closed && s.hook != nil {
		s.hook(c)
	}
}

// StartRuntimeProcess starts cmd, a `python -m mlx_serving_runtime ...` process,
// with its stdin and stdout as the protocol's pipes, and returns a client on them
// and the process's stdin: closing it asks the runtime to exit (it exits at EOF).
// Whoever calls it waits for cmd. For a runtime outside a worker's supervisor
// (`version`, the bench).
func StartRuntimeProcess(cmd *exec.Cmd, opts RuntimeClientOptions) (*RuntimeClient, io.WriteCloser, error) {
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start runtime: %w", err)
	}
	return NewRuntimeClient(stdout, stdin, opts), stdin, nil
}

// NewRuntimeClient starts the reader goroutine on r and returns a client writing to w.
func NewRuntimeClient(r io.Reader, w io.Writer, opts RuntimeClientOptions) *RuntimeClient {
	if opts.MaxLineBytes <= 0 {
		opts.MaxLineBytes = DefaultMaxLineBytes
	}
	c := &RuntimeClient{
		log:     opts.Logger,
		w:       bufio.NewWriterSize(w, writeBuffer),
		pending: map[int64]chan *schemas.RPCResponse{},
		streams: map[string]*chunkStream{},
		done:    make(chan struct{}),
	}
	if wc, ok := w.(io.Closer); ok {
		c.wc = wc
	}
	go c.readLoop(r, opts.MaxLineBytes)
	return c
}

// Done is closed once the client can no longer talk to the runtime.
func (c *RuntimeClient) Done() <-chan struct{} { return c.done }

// Err is why the client is done (wraps ErrRuntimeExited), nil while it is not.
func (c *RuntimeClient) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close fails every pending call with ErrRuntimeExited and closes the write side.
func (c *RuntimeClient) Close() { c.fail(ErrRuntimeExited) }

func (c *RuntimeClient) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	if !errors.Is(err, ErrRuntimeExited) {
		err = fmt.Errorf("%w: %w", ErrRuntimeExited, err)
	}
	c.err = err
	close(c.done)
	c.mu.Unlock()
	if c.wc != nil {
		_ = c.wc.Close()
	}
}

// incoming is every message the runtime sends, decoded once. Params is typed as a
// chunk because generate.chunk is the only notification of the protocol: the token
// path then costs one decode per line.
type incoming struct {
	ID     json.RawMessage        `json:"id"`
	Method string                 `json:"method"`
	Params *schemas.GenerateChunk `json:"params"`
	Result json.RawMessage        `json:"result"`
	Error  *schemas.RPCError      `json:"error"`
}

func (c *RuntimeClient) readLoop(r io.Reader, maxLine int) {
	sc := bufio.NewScanner(r)
	// The first buffer is capped by maxLine too: bufio only enforces the limit once it
	// has to grow, so a larger first buffer would accept lines over it. It starts
	// at a chunk line's size and grows (doubling) only when a long result comes.
	sc.Buffer(make([]byte, 0, min(4<<10, maxLine)), maxLine)
	m := incoming{Params: &schemas.GenerateChunk{}}
	for sc.Scan() {
		line := sc.Bytes()
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		// One message value is reused for every line: the chunk struct and the
		// raw id are decoded in place, so a chunk costs only its two strings.
		m.ID, m.Method, m.Result, m.Error = m.ID[:0], "", nil, nil
		if m.Params == nil { // a line said "params": null
			m.Params = &schemas.GenerateChunk{}
		} else {
			*m.Params = schemas.GenerateChunk{}
		}
		// A plain chunk line, the runtime's output for every token, is read
		// without encoding/json's reflection (chunkline.go).
		if parseChunkLine(line, m.Params) {
			c.routeNotification(m.Params)
			continue
		}
		if err := json.Unmarshal(line, &m); err != nil {
			c.log.Warn().Err(err).Str("line", truncate(line, 200)).Msg("runtime sent a line that is not a protocol message")
			continue
		}
		if m.Method != "" {
			if m.Method != schemas.NotifyGenerateChunk {
				c.log.Debug().Str("method", m.Method).Msg("runtime notification ignored")
				continue
			}
			c.routeNotification(m.Params)
			continue
		}
		c.routeResponse(&m)
	}
	err := sc.Err()
	if err == nil {
		err = io.EOF
	}
	c.fail(fmt.Errorf("%w: reading stdout: %w", ErrRuntimeExited, err))
}

func (c *RuntimeClient) routeNotification(p *schemas.GenerateChunk) {
	if p == nil || p.RequestID == "" {
		c.log.Debug().Msg("runtime chunk without a request_id ignored")
		return
	}
	c.mu.Lock()
	s := c.streams[p.RequestID]
	c.mu.Unlock()
	if s == nil {
		return // the caller gave up on this generate
	}
	// The hook runs here, on the reader: a hook that blocks stalls every
	// request's chunks and responses (the worker's only publishes to the NATS
	// client's buffer).
	s.deliver(p)
}

func (c *RuntimeClient) routeResponse(m *incoming) {
	id, err := strconv.ParseInt(string(m.ID), 10, 64)
	if err != nil {
		// A null id answers a line the runtime could not read: ours are always
		// well-formed, so this is worth a warning and nothing else.
		c.log.Warn().Str("id", string(m.ID)).Interface("error", m.Error).Msg("runtime response without a usable id")
		return
	}
	c.mu.Lock()
	ch := c.pending[id]
	delete(c.pending, id)
	c.mu.Unlock()
	if ch == nil {
		return
	}
	// m is reused for the next line: the response keeps its own copies.
	ch <- &schemas.RPCResponse{JSONRPC: schemas.JSONRPCVersion, ID: append(json.RawMessage(nil), m.ID...), Result: m.Result, Error: m.Error}
}

// send registers a pending call and writes the request line.
func (c *RuntimeClient) send(method string, params any) (int64, chan *schemas.RPCResponse, error) {
	if params == nil {
		params = schemas.EmptyParams{}
	}
	id := c.nextID.Add(1)
	ch := make(chan *schemas.RPCResponse, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return 0, nil, err
	}
	c.pending[id] = ch
	c.mu.Unlock()

	line, err := json.Marshal(schemas.RPCRequest{JSONRPC: schemas.JSONRPCVersion, ID: id, Method: method, Params: params})
	if err != nil {
		c.forget(id)
		return 0, nil, fmt.Errorf("runtime %s: encode params: %w", method, err)
	}
	c.wmu.Lock()
	_, err = c.w.Write(append(line, '\n'))
	if err == nil {
		err = c.w.Flush()
	}
	c.wmu.Unlock()
	if err != nil {
		c.forget(id)
		c.fail(fmt.Errorf("writing stdin: %w", err))
		return 0, nil, c.Err()
	}
	return id, ch, nil
}

func (c *RuntimeClient) forget(id int64) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

func (c *RuntimeClient) decode(method string, resp *schemas.RPCResponse, out any) error {
	if resp.Error != nil {
		return &RuntimeError{Method: method, Err: *resp.Error}
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(resp.Result, out); err != nil {
		return fmt.Errorf("runtime %s: decode result: %w", method, err)
	}
	return nil
}

// Call sends one request and waits for its response, decoding the result into out
// (which may be nil). A *RuntimeError reports an error response.
func (c *RuntimeClient) Call(ctx context.Context, method string, params, out any) error {
	id, ch, err := c.send(method, params)
	if err != nil {
		return err
	}
	select {
	case resp := <-ch:
		return c.decode(method, resp, out)
	case <-c.done:
		return c.Err()
	case <-ctx.Done():
		c.forget(id)
		return fmt.Errorf("runtime %s: %w", method, ctx.Err())
	}
}

// Info calls runtime.info.
func (c *RuntimeClient) Info(ctx context.Context) (*schemas.RuntimeInfo, error) {
	var out schemas.RuntimeInfo
	if err := c.Call(ctx, schemas.MethodRuntimeInfo, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Health calls health.
func (c *RuntimeClient) Health(ctx context.Context) (*schemas.HealthResult, error) {
	var out schemas.HealthResult
	if err := c.Call(ctx, schemas.MethodHealth, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// LoadModel calls model.load.
func (c *RuntimeClient) LoadModel(ctx context.Context, p schemas.ModelLoadParams) (*schemas.ModelLoadResult, error) {
	var out schemas.ModelLoadResult
	if err := c.Call(ctx, schemas.MethodModelLoad, p, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Cancel calls cancel; false means the runtime did not know the request (any more).
func (c *RuntimeClient) Cancel(ctx context.Context, requestID string) (bool, error) {
	var out schemas.CancelResult
	if err := c.Call(ctx, schemas.MethodCancel, schemas.CancelParams{RequestID: requestID}, &out); err != nil {
		return false, err
	}
	return out.Cancelled, nil
}

// Shutdown calls shutdown; the runtime exits after answering.
func (c *RuntimeClient) Shutdown(ctx context.Context, mode string) (*schemas.ShutdownResult, error) {
	var out schemas.ShutdownResult
	if err := c.Call(ctx, schemas.MethodShutdown, schemas.ShutdownParams{Mode: mode}, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// GenerateHooks are called while a generate runs, in order, never concurrently.
type GenerateHooks struct {
	// Sent runs once the request line is written, before any chunk: from then on a
	// cancel for this request_id reaches the runtime after the generate itself.
	Sent func()
	// Chunk runs for every generate.chunk, in order, on the client's reader
	// goroutine: it must not block (nor call the client). The pointer is valid
	// only during the call.
	Chunk func(*schemas.GenerateChunk)
}

// Generate runs one generate, handing every chunk to hooks.Chunk before it returns
// the result. When ctx ends first it asks the runtime to cancel the request and
// returns ctx's error without waiting for the runtime's answer; no hook runs
// after Generate returned.
func (c *RuntimeClient) Generate(ctx context.Context, p *schemas.GenerateParams, hooks GenerateHooks) (*schemas.GenerateResult, error) {
	s := &chunkStream{hook: hooks.Chunk}
	c.mu.Lock()
	if _, dup := c.streams[p.RequestID]; dup {
		c.mu.Unlock()
		return nil, &RuntimeError{Method: schemas.MethodGenerate, Err: schemas.RPCError{
			Code: schemas.RPCDuplicateRequest, Message: "request_id already in flight on this client",
			Data: &schemas.RPCErrorData{Code: schemas.CodeDuplicateRequest},
		}}
	}
	c.streams[p.RequestID] = s
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.streams, p.RequestID)
		c.mu.Unlock()
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
	}()

	// Held until Sent has run, so no chunk overtakes it. The runtime sends a
	// chunk of this request only after reading the whole request line, so the
	// write below never waits on a reader blocked here.
	s.mu.Lock()
	id, ch, err := c.send(schemas.MethodGenerate, p)
	if err == nil && hooks.Sent != nil {
		hooks.Sent()
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	select {
	case resp := <-ch:
		// The reader ran the hook for every chunk before it routed the response
		// that follows them.
		var out schemas.GenerateResult
		if err := c.decode(schemas.MethodGenerate, resp, &out); err != nil {
			return nil, err
		}
		return &out, nil
	case <-c.done:
		return nil, c.Err()
	case <-ctx.Done():
		c.forget(id)
		go func() {
			cctx, cancel := context.WithTimeout(context.Background(), defaultCallTimeout)
			defer cancel()
			_, _ = c.Cancel(cctx, p.RequestID)
		}()
		return nil, fmt.Errorf("runtime generate: %w", ctx.Err())
	}
}

func truncate(b []byte, n int) string {
	if len(b) <= n {
		return string(b)
	}
	return string(b[:n]) + "…"
}
