package bench

import (
	"context"
	"fmt"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// busDriver is what a Go backend service does: bus.SubmitStream, then read the
// token events from the job's reply subject until the terminal one.
type busDriver struct {
	nc    *nats.Conn
	prod  *bus.Client
	model string
}

func newBusDriver(nc *nats.Conn, model string) (*busDriver, error) {
	p, err := bus.NewClient(nc, bus.WithTenant("bench"))
	if err != nil {
		return nil, err
	}
	return &busDriver{nc: nc, prod: p, model: model}, nil
}

func (d *busDriver) Do(ctx context.Context, req Request, rec *Recorder) (int, error) {
	zero := 0.0
	job := &schemas.JobRequest{Model: d.model, Prompt: req.Prompt, MaxTokens: req.MaxTokens, Sampling: schemas.Sampling{Temperature: &zero}, Priority: "normal"}
	s, _, err := bus.SubmitStream(ctx, d.prod, d.nc, job, bus.StreamOptions{})
	if err != nil {
		return 0, err
	}
	defer s.Close()
	last := 0
	for ev, err := range s.Events(ctx) {
		if err != nil {
			return 0, err
		}
		if ev.Token != nil {
			rec.Token(ev.Token.Tokens - last)
			last = ev.Token.Tokens
			continue
		}
		if ev.Result.Status != schemas.StatusCompleted {
			msg := ev.Result.Status
			if ev.Result.Error != nil {
				msg += ": " + ev.Result.Error.Code + " " + ev.Result.Error.Message
			}
			return 0, fmt.Errorf("job %s %s", job.ID, msg)
		}
		return ev.Result.Usage.CompletionTokens, nil
	}
	return 0, fmt.Errorf("job %s: stream ended without a terminal event", job.ID)
}
