package worker

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// lineRecorder keeps every line that passes through it.
type lineRecorder struct {
	mu    sync.Mutex
	buf   []byte
	lines [][]byte
}

func (r *lineRecorder) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.buf = append(r.buf, p...)
	for {
		i := bytes.IndexByte(r.buf, '\n')
		if i < 0 {
			return len(p), nil
		}
		r.lines = append(r.lines, append([]byte(nil), r.buf[:i]...))
		r.buf = r.buf[i+1:]
	}
}

// What the real runtime sends the client validates against the protocol schemas:
// the client itself never checks, so this is where a drift shows.
func TestRealRuntimeMessagesMatchSchemas(t *testing.T) {
	t.Parallel()
	cmd := exec.Command(pythonPath(t), "-m", RuntimeModule, "--max-batch", "2")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	rec := &lineRecorder{}
	c := NewRuntimeClient(io.TeeReader(stdout, rec), stdin, RuntimeClientOptions{})
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	if _, err := c.Info(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.LoadModel(ctx, schemas.ModelLoadParams{Model: tinyModel(t), ID: "tiny"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Health(ctx); err != nil {
		t.Fatal(err)
	}
	chunks := 0
	res, err := c.Generate(ctx, &schemas.GenerateParams{RequestID: "g.1", Model: "tiny", Prompt: "Hello", MaxTokens: 16},
		GenerateHooks{Chunk: func(*schemas.GenerateChunk) { chunks++ }})
	if err != nil || chunks == 0 || res.Usage.CompletionTokens == 0 {
		t.Fatalf("generate: %+v after %d chunks: %v", res, chunks, err)
	}
	if _, err := c.Cancel(ctx, "unknown.1"); err != nil {
		t.Fatal(err)
	}
	_, err = c.Generate(ctx, &schemas.GenerateParams{RequestID: "g.2", Model: "missing", Prompt: "x"}, GenerateHooks{})
	if rerr, ok := err.(*RuntimeError); !ok || rerr.Code() != schemas.CodeModelNotLoaded {
		t.Fatalf("missing model: %v", err)
	}
	if _, err := c.Shutdown(ctx, schemas.ShutdownDrain); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.Done():
	case <-ctx.Done():
		t.Fatal("runtime did not exit after shutdown")
	}

	// Requests were numbered 1.. in the order above.
	resultType := map[int64]schemas.Type{
		1: schemas.RuntimeInfoResult, 2: schemas.RuntimeModelLoadResult, 3: schemas.RuntimeHealthResult,
		4: schemas.RuntimeGenerateResult, 5: schemas.RuntimeCancelResult, 7: schemas.RuntimeShutdownResult,
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	seen := map[schemas.Type]int{}
	for _, line := range rec.lines {
		var env struct {
			ID     *int64          `json:"id"`
			Method string          `json:"method"`
			Params json.RawMessage `json:"params"`
			Result json.RawMessage `json:"result"`
		}
		if err := json.Unmarshal(line, &env); err != nil {
			t.Fatalf("not JSON: %s", line)
		}
		if env.Method != "" {
			if err := schemas.Validate(schemas.RuntimeNotification, line); err != nil {
				t.Errorf("notification: %v: %s", err, line)
			}
			if err := schemas.Validate(schemas.RuntimeGenerateChunk, env.Params); err != nil {
				t.Errorf("chunk: %v: %s", err, line)
			}
			seen[schemas.RuntimeGenerateChunk]++
			continue
		}
		if err := schemas.Validate(schemas.RuntimeResponse, line); err != nil {
			t.Errorf("response: %v: %s", err, line)
		}
		if env.ID == nil || env.Result == nil {
			continue
		}
		if typ, ok := resultType[*env.ID]; ok {
			if err := schemas.Validate(typ, env.Result); err != nil {
				t.Errorf("%s: %v: %s", typ, err, env.Result)
			}
			seen[typ]++
		}
	}
	if len(seen) != len(resultType)+1 {
		t.Fatalf("validated %v; some answers never came", seen)
	}
}
