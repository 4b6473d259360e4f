package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/mlx-serving/mlx-serving/worker"
)

// runtimeDriver talks to its own runtime process over the pipe, with the
// worker's client: the runtime path minus NATS, dispatcher and worker.
type runtimeDriver struct {
	cmd    *exec.Cmd
	client *worker.RuntimeClient
	model  string
	seq    atomic.Int64
}

func startRuntime(ctx context.Context, python, modelDir string, maxBatch int) (*runtimeDriver, error) {
	cmd := exec.Command(python, "-m", worker.RuntimeModule, "--max-batch", strconv.Itoa(maxBatch))
	cmd.Env = append(os.Environ(), "HF_HUB_OFFLINE=1", "MLX_SERVING_LOG_LEVEL=WARNING")
	cmd.Stderr = os.Stderr
	client, _, err := worker.StartRuntimeProcess(cmd, worker.RuntimeClientOptions{})
	if err != nil {
		return nil, err
	}
	d := &runtimeDriver{cmd: cmd, client: client, model: "bench"}
	lctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	if _, err := d.client.LoadModel(lctx, schemas.ModelLoadParams{Model: modelDir, ID: d.model}); err != nil {
		d.Close()
		return nil, fmt.Errorf("runtime model.load: %w", err)
	}
	return d, nil
}

func (d *runtimeDriver) Do(ctx context.Context, req Request, rec *Recorder) (int, error) {
	zero := 0.0
	p := &schemas.GenerateParams{
		RequestID: "r" + strconv.FormatInt(d.seq.Add(1), 10), Model: d.model,
		Prompt: req.Prompt, MaxTokens: req.MaxTokens, Sampling: schemas.Sampling{Temperature: &zero},
	}
	last := 0
	res, err := d.client.Generate(ctx, p, worker.GenerateHooks{Chunk: func(c *schemas.GenerateChunk) {
		rec.Token(c.Tokens - last)
		last = c.Tokens
	}})
	if err != nil {
		return 0, err
	}
	return res.Usage.CompletionTokens, nil
}

func (d *runtimeDriver) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, _ = d.client.Shutdown(ctx, "cancel")
	d.client.Close()
	done := make(chan struct{})
	go func() { _ = d.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-done
	}
}
