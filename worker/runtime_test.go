package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// pipeRuntime connects a client to an in-process fake runtime.
func pipeRuntime(t *testing.T, o fakeOptions) (*RuntimeClient, func()) {
	t.Helper()
	inR, inW := io.Pipe()   // client → runtime
	outR, outW := io.Pipe() // runtime → client
	done := make(chan struct{})
	go func() {
		defer close(done)
		runFakeRuntime(inR, outW, o)
		outW.Close()
	}()
	c := NewRuntimeClient(outR, inW, RuntimeClientOptions{})
	stop := func() {
		c.Close()
		<-done
	}
	t.Cleanup(stop)
	return c, stop
}

func TestRuntimeClientConcurrentGenerates(t *testing.T) {
	t.Parallel()
	c, _ := pipeRuntime(t, fakeOptions{tokenDelay: 100 * time.Microsecond})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.LoadModel(ctx, schemas.ModelLoadParams{Model: "/x/tiny"}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			n := 20 + i
			var got strings.Builder
			seq := 0
			res, err := c.Generate(ctx, &schemas.GenerateParams{RequestID: fmt.Sprintf("r%d", i), Model: "tiny", MaxTokens: n}, GenerateHooks{
				Chunk: func(ch *schemas.GenerateChunk) {
					if ch.Seq != seq || ch.RequestID != fmt.Sprintf("r%d", i) {
						errs <- fmt.Errorf("r%d: chunk %+v out of order (want seq %d)", i, ch, seq)
					}
					seq++
					got.WriteString(ch.Text)
				},
			})
			if err != nil {
				errs <- err
				return
			}
			if res.Text != got.String() || seq != n || res.Usage.CompletionTokens != n {
				errs <- fmt.Errorf("r%d: result %q after %d chunks, streamed %q", i, res.Text, seq, got.String())
			}
		}(i)
	}
	// Small calls interleave with the streams and still get their own answers.
	for i := 0; i < 20; i++ {
		h, err := c.Health(ctx)
		if err != nil || !h.OK {
			t.Fatalf("health during generates: %+v %v", h, err)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestRuntimeClientErrorResponse(t *testing.T) {
	t.Parallel()
	c, _ := pipeRuntime(t, fakeOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := c.Generate(ctx, &schemas.GenerateParams{RequestID: "x", Model: "nope"}, GenerateHooks{})
	var rerr *RuntimeError
	if !errors.As(err, &rerr) || rerr.Code() != schemas.CodeModelNotLoaded || rerr.Err.Code != schemas.RPCModelNotLoaded {
		t.Fatalf("want model_not_loaded RuntimeError, got %v", err)
	}
	err = c.Call(ctx, "no.such.method", nil, nil)
	if !errors.As(err, &rerr) || rerr.Code() != schemas.CodeMethodNotFound {
		t.Fatalf("want method_not_found, got %v", err)
	}
}

func TestRuntimeClientCancelAndContext(t *testing.T) {
	t.Parallel()
	c, _ := pipeRuntime(t, fakeOptions{tokenDelay: 2 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Cancel through the protocol: the generate answers with finish_reason cancelled.
	got := make(chan struct{}, 1)
	go func() {
		<-got
		if ok, err := c.Cancel(ctx, "c1"); err != nil || !ok {
			t.Errorf("cancel: %v %v", ok, err)
		}
	}()
	res, err := c.Generate(ctx, &schemas.GenerateParams{RequestID: "c1", Model: "tiny", MaxTokens: 10000}, GenerateHooks{
		Chunk: func(*schemas.GenerateChunk) {
			select {
			case got <- struct{}{}:
			default:
			}
		},
	})
	if err != nil || res.FinishReason != schemas.FinishCancelled {
		t.Fatalf("want cancelled result, got %+v %v", res, err)
	}
	// A generate whose ctx ends returns at once and the runtime is told to cancel.
	gctx, gcancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer gcancel()
	_, err = c.Generate(gctx, &schemas.GenerateParams{RequestID: "c2", Model: "tiny", MaxTokens: 10000}, GenerateHooks{})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("want deadline exceeded, got %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		h, err := c.Health(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if h.InFlight == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("runtime still has %d in flight after the caller gave up", h.InFlight)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestRuntimeClientExitFailsPending(t *testing.T) {
	t.Parallel()
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	c := NewRuntimeClient(outR, inW, RuntimeClientOptions{})
	defer c.Close()
	// A runtime that reads one request, sends half a chunk stream, then dies.
	go func() {
		buf := make([]byte, 4096)
		_, _ = inR.Read(buf)
		fmt.Fprintln(outW, `{"jsonrpc":"2.0","method":"generate.chunk","params":{"request_id":"d","seq":0,"text":"a","tokens":1}}`)
		outW.Close()
	}()
	chunks := 0
	_, err := c.Generate(context.Background(), &schemas.GenerateParams{RequestID: "d", Model: "tiny"}, GenerateHooks{
		Chunk: func(*schemas.GenerateChunk) { chunks++ },
	})
	if !errors.Is(err, ErrRuntimeExited) {
		t.Fatalf("want ErrRuntimeExited, got %v", err)
	}
	select {
	case <-c.Done():
	default:
		t.Fatal("client not done after EOF")
	}
	if err := c.Call(context.Background(), "health", nil, nil); !errors.Is(err, ErrRuntimeExited) {
		t.Fatalf("call after exit: %v", err)
	}
}

func TestRuntimeClientLineLimits(t *testing.T) {
	t.Parallel()
	big := strings.Repeat("x", 2<<20)
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	c := NewRuntimeClient(outR, inW, RuntimeClientOptions{MaxLineBytes: 4 << 20})
	defer c.Close()
	go func() {
		dec := json.NewDecoder(inR)
		for i := 0; ; i++ {
			var req schemas.RPCRequest
			if err := dec.Decode(&req); err != nil {
				return
			}
			text := big
			if i == 1 {
				text = big + big + big // past the 4 MiB bound
			}
			b, _ := json.Marshal(map[string]any{"jsonrpc": "2.0", "id": req.ID, "result": map[string]any{"request_id": "b", "finish_reason": "length", "text": text}})
			outW.Write(append(b, '\n'))
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := c.Generate(ctx, &schemas.GenerateParams{RequestID: "b", Model: "tiny"}, GenerateHooks{})
	if err != nil || len(res.Text) != len(big) {
		t.Fatalf("2 MiB line: %v", err)
	}
	_, err = c.Generate(ctx, &schemas.GenerateParams{RequestID: "b", Model: "tiny"}, GenerateHooks{})
	if !errors.Is(err, ErrRuntimeExited) {
		t.Fatalf("over-long line must end the client, got %v", err)
	}
}

// The requests the client writes and the responses the fake sends are checked
// against the protocol schemas, which the hot path never does.
func TestRuntimeClientMessagesMatchSchemas(t *testing.T) {
	t.Parallel()
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	c := NewRuntimeClient(outR, inW, RuntimeClientOptions{})
	defer c.Close()
	lines := make(chan []byte, 16)
	go func() {
		dec := json.NewDecoder(inR)
		for {
			var raw json.RawMessage
			if err := dec.Decode(&raw); err != nil {
				close(lines)
				return
			}
			lines <- raw
			var req schemas.RPCRequest
			_ = json.Unmarshal(raw, &req)
			outW.Write([]byte(fmt.Sprintf(`{"jsonrpc":"2.0","id":%d,"result":{}}`+"\n", req.ID)))
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	temp, seed := 0.7, int64(3)
	calls := []struct {
		method string
		params any
		typ    schemas.Type
	}{
		{schemas.MethodRuntimeInfo, nil, schemas.RuntimeInfoParams},
		{schemas.MethodHealth, nil, schemas.RuntimeHealthParams},
		{schemas.MethodModelLoad, schemas.ModelLoadParams{Model: "/m/tiny", ID: "tiny"}, schemas.RuntimeModelLoadParams},
		{schemas.MethodCancel, schemas.CancelParams{RequestID: "j.1"}, schemas.RuntimeCancelParams},
		{schemas.MethodShutdown, schemas.ShutdownParams{Mode: schemas.ShutdownCancel}, schemas.RuntimeShutdownParams},
		{schemas.MethodGenerate, generateParams(newJobRun(schemas.AssignedJob{Attempt: 2, Job: schemas.JobRequest{
			ID: "j", Model: "tiny", Messages: []schemas.Message{{Role: "user", Content: "hi"}}, MaxTokens: 20,
			Sampling: schemas.Sampling{Temperature: &temp, Seed: &seed, Stop: []string{"\n\n"}}, JSONSchema: map[string]any{"type": "object"},
		}, Resume: &schemas.Resume{Text: "Hello", CompletionTokens: 2}}, "d1")), schemas.RuntimeGenerateParams},
	}
	for _, call := range calls {
		if err := c.Call(ctx, call.method, call.params, nil); err != nil {
			t.Fatalf("%s: %v", call.method, err)
		}
		raw := <-lines
		if err := schemas.Validate(schemas.RuntimeRequest, raw); err != nil {
			t.Errorf("%s request envelope: %v: %s", call.method, err, raw)
		}
		var env struct {
			Params json.RawMessage `json:"params"`
		}
		_ = json.Unmarshal(raw, &env)
		if err := schemas.Validate(call.typ, env.Params); err != nil {
			t.Errorf("%s params: %v: %s", call.method, err, env.Params)
		}
	}
}

// Chunk hooks run on the client's reader goroutine; once Generate has returned
// (here: its context ended mid-stream) the hook never runs again, so the job's
// emitter cannot publish after the job ended. Mutation caught: dropping
// `s.closed = true` from Generate's exit lets a chunk the reader already took
// from the map reach the hook.
func TestGenerateNoHookAfterReturn(t *testing.T) {
	t.Parallel()
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	c := NewRuntimeClient(outR, inW, RuntimeClientOptions{})
	defer c.Close()
	go func() {
		dec := json.NewDecoder(inR)
		var req schemas.RPCRequest
		if dec.Decode(&req) != nil {
			return
		}
		fmt.Fprintln(outW, `{"jsonrpc":"2.0","method":"generate.chunk","params":{"request_id":"g","seq":0,"text":"a","tokens":1}}`)
		_, _ = io.Copy(io.Discard, inR) // the cancel that follows
	}()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var calls []string
	var taken *chunkStream
	_, err := c.Generate(ctx, &schemas.GenerateParams{RequestID: "g", Model: "tiny"}, GenerateHooks{
		Sent: func() { calls = append(calls, "sent") },
		Chunk: func(ch *schemas.GenerateChunk) {
			calls = append(calls, ch.Text)
			c.mu.Lock()
			taken = c.streams["g"] // what the reader holds while a chunk is on its way
			c.mu.Unlock()
			cancel()
		},
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Generate: %v, want context.Canceled", err)
	}
	if taken == nil {
		t.Fatal("the chunk hook never ran")
	}
	taken.deliver(&schemas.GenerateChunk{RequestID: "g", Seq: 1, Text: "late", Tokens: 2})
	if strings.Join(calls, ",") != "sent,a" {
		t.Fatalf("hook calls %q, want sent then the one chunk before the return", calls)
	}
}
