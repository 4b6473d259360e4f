package worker

import (
	"bufio"
	"encoding/json"
	"io"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// The fake runtime: the test binary itself, run as a child process (TestMain,
// fakeRuntimeEnv), speaking the runtime protocol without Python.

type fakeOptions struct {
	tokenDelay time.Duration
	hangHealth bool // stop answering health checks while a generate runs, like a wedged runtime
	busyFirst  int  // the first this many generates are refused runtime_busy, as a runtime whose compile threads are full
	// failFirst, when set, is the code the first generate fails with after two
	// chunks (a decode step that raised: batch_failed, generation_failed).
	failFirst string
}

// runFakeRuntime speaks the runtime protocol well enough for the RPC client and the
// supervisor: generate streams max_tokens chunks "t<i> ", cancel stops one.
func runFakeRuntime(r io.Reader, w io.Writer, o fakeOptions) {
	var wmu sync.Mutex
	out := bufio.NewWriter(w)
	send := func(v any) {
		b, _ := json.Marshal(v)
		wmu.Lock()
		out.Write(append(b, '\n'))
		out.Flush()
		wmu.Unlock()
	}
	var mu sync.Mutex
	cancels := map[string]chan struct{}{}
	models := []string{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	var wg sync.WaitGroup
	for sc.Scan() {
		var req struct {
			ID     json.RawMessage `json:"id"`
			Method string          `json:"method"`
			Params json.RawMessage `json:"params"`
		}
		if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
			send(map[string]any{"jsonrpc": "2.0", "id": nil, "error": map[string]any{"code": -32700, "message": "parse", "data": map[string]any{"code": "parse_error"}}})
			continue
		}
		ok := func(res any) { send(map[string]any{"jsonrpc": "2.0", "id": req.ID, "result": res}) }
		fail := func(code int, sc, msg string) {
			send(map[string]any{"jsonrpc": "2.0", "id": req.ID, "error": map[string]any{"code": code, "message": msg, "data": map[string]any{"code": sc}}})
		}
		switch req.Method {
		case "runtime.info":
			mu.Lock()
			ok(map[string]any{"runtime_version": "fake", "mlx_version": "0", "mlx_lm_version": "0", "python_version": "0",
				"platform": "fake", "device": "cpu", "memory": map[string]any{"total_bytes": 1 << 30, "active_bytes": 0, "peak_bytes": 0},
				"max_batch": 8, "max_models": 2, "models": models})
			mu.Unlock()
		case "health":
			mu.Lock()
			if o.hangHealth && len(cancels) > 0 {
				mu.Unlock()
				continue
			}
			ok(map[string]any{"ok": true, "in_flight": len(cancels), "models": models, "decoded_tokens": 0})
			mu.Unlock()
		case "model.load":
			var p schemas.ModelLoadParams
			_ = json.Unmarshal(req.Params, &p)
			id := p.ID
			if id == "" {
				id = filepath.Base(p.Model)
			}
			mu.Lock()
			models = append(models, id)
			mu.Unlock()
			ok(map[string]any{"id": id, "path": p.Model, "context_length": 2048, "vocab_size": 100, "load_time_ms": 1})
		case "cancel":
			var p schemas.CancelParams
			_ = json.Unmarshal(req.Params, &p)
			mu.Lock()
			ch, found := cancels[p.RequestID]
			if found {
				delete(cancels, p.RequestID)
				close(ch)
			}
			mu.Unlock()
			ok(map[string]any{"request_id": p.RequestID, "cancelled": found})
		case "shutdown":
			ok(map[string]any{"ok": true, "cancelled": 0})
			wg.Wait()
			return
		case "generate":
			var p schemas.GenerateParams
			_ = json.Unmarshal(req.Params, &p)
			if o.busyFirst > 0 {
				o.busyFirst--
				fail(schemas.RPCRuntimeBusy, schemas.CodeRuntimeBusy, "grammar compiles run, the most at once")
				continue
			}
			if p.Model != "tiny" {
				fail(-32001, "model_not_loaded", "model not loaded")
				continue
			}
			if o.failFirst != "" {
				code := o.failFirst
				o.failFirst = ""
				for n := range 2 {
					send(map[string]any{"jsonrpc": "2.0", "method": "generate.chunk", "params": map[string]any{"request_id": p.RequestID, "seq": n, "text": "t" + strconv.Itoa(n) + " ", "tokens": n + 1}})
				}
				info, _ := schemas.LookupCode(code)
				fail(info.RPC, code, "a decode step of 2 rows raised RuntimeError: boom")
				continue
			}
			if p.MaxTokens == 0 {
				p.MaxTokens = 256
			}
			stop := make(chan struct{})
			mu.Lock()
			cancels[p.RequestID] = stop
			mu.Unlock()
			id := req.ID
			wg.Add(1)
			go func() {
				defer wg.Done()
				var text strings.Builder
				finish := "length"
				n := 0
			loop:
				for n < p.MaxTokens {
					select {
					case <-stop:
						finish = "cancelled"
						break loop
					default:
					}
					if o.tokenDelay > 0 {
						time.Sleep(o.tokenDelay)
					}
					d := "t" + strconv.Itoa(n) + " "
					n++
					text.WriteString(d)
					send(map[string]any{"jsonrpc": "2.0", "method": "generate.chunk", "params": map[string]any{"request_id": p.RequestID, "seq": n - 1, "text": d, "tokens": n}})
				}
				mu.Lock()
				delete(cancels, p.RequestID)
				mu.Unlock()
				send(map[string]any{"jsonrpc": "2.0", "id": id, "result": map[string]any{
					"request_id": p.RequestID, "finish_reason": finish, "text": text.String(),
					"usage":   map[string]any{"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n},
					"timings": map[string]any{"ttft_ms": 1, "total_ms": 2, "tokens_per_s": 100},
				}})
			}()
		default:
			fail(-32601, "method_not_found", "unknown method "+req.Method)
		}
	}
	wg.Wait()
}
