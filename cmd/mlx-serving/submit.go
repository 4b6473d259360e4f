package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/mlx-serving/mlx-serving/auth"
	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/schemas"
)

func init() {
	register("submit", "submit a job and stream its tokens (prompt from args or stdin)", cmdSubmit)
	register("result", "print a job's durable terminal result", cmdResult)
	register("cancel", "cancel a queued or running job", cmdCancel)
}

// Exit codes of submit follow the job's terminal status, so scripts can branch on it.
const (
	exitCompleted   = 0
	exitFailed      = 1
	exitUsage       = 2
	exitUnreachable = 3
	exitCancelled   = 4
	exitExpired     = 5
	exitNoResult    = 6
)

func statusExit(status string) int {
	switch status {
	case schemas.StatusCompleted:
		return exitCompleted
	case schemas.StatusCancelled:
		return exitCancelled
	case schemas.StatusExpired:
		return exitExpired
	}
	return exitFailed
}

func cmdSubmit(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var (
		model, messages, id, priority, tenant, stop, schemaFile string
		maxTokens                                               int
		temperature, topP                                       float64
		seed                                                    int64
		detach                                                  bool
		timeout                                                 time.Duration
	)
	s, code, ok := openClient(ctx, "submit", args, stderr, func(fs *flagSet) {
		fs.StringVar(&model, "m", "tiny", "model id")
		fs.StringVar(&messages, "messages", "", `chat messages as JSON, e.g. '[{"role":"user","content":"hi"}]'`)
		fs.StringVar(&id, "id", "", "job id (default: a new ULID); resubmitting an id is reported, not run twice")
		fs.StringVar(&priority, "priority", "normal", "high, normal or low")
		fs.StringVar(&tenant, "tenant", "", "tenant")
		fs.StringVar(&stop, "stop", "", "stop sequences, comma-separated")
		fs.StringVar(&schemaFile, "json-schema", "", "file with a JSON schema the output must follow")
		fs.IntVar(&maxTokens, "max-tokens", 128, "most tokens to generate")
		fs.Float64Var(&temperature, "temperature", 0, "sampling temperature (0 = greedy)")
		fs.Float64Var(&topP, "top-p", 1, "nucleus sampling")
		fs.Int64Var(&seed, "seed", -1, "sampling seed (-1: none)")
		fs.BoolVar(&detach, "detach", false, "print the job id and return without waiting")
		fs.DurationVar(&timeout, "timeout", 0, "deadline for the job (0: none)")
	})
	if !ok {
		return code
	}
	defer s.Close()

	if tenant == "" {
		tenant = credentialTenant(s.cfg.NATSUser)
	}
	job := &schemas.JobRequest{ID: id, Model: model, MaxTokens: maxTokens, Priority: priority, Tenant: tenant}
	if temperature != 0 {
		job.Temperature = &temperature
	}
	if topP != 1 {
		job.TopP = &topP
	}
	if seed >= 0 {
		job.Seed = &seed
	}
	if stop != "" {
		job.Stop = strings.Split(stop, ",")
	}
	if timeout > 0 {
		d := time.Now().Add(timeout).UTC()
		job.Deadline = &d
	}
	if schemaFile != "" {
		raw, err := os.ReadFile(schemaFile)
		if err == nil {
			err = json.Unmarshal(raw, &job.JSONSchema)
		}
		if err != nil {
			fmt.Fprintf(stderr, "mlx-serving submit: --json-schema: %v\n", err)
			return exitUsage
		}
	}
	switch {
	case messages != "":
		if err := json.Unmarshal([]byte(messages), &job.Messages); err != nil {
			fmt.Fprintf(stderr, "mlx-serving submit: --messages: %v\n", err)
			return exitUsage
		}
	case len(s.args) > 0:
		job.Prompt = strings.Join(s.args, " ")
	default:
		raw, err := io.ReadAll(os.Stdin)
		if err != nil {
			fmt.Fprintf(stderr, "mlx-serving submit: reading stdin: %v\n", err)
			return exitUsage
		}
		job.Prompt = string(raw)
	}

	if detach {
		ack, err := s.prod.Submit(ctx, job)
		if err != nil {
			return submitError(stderr, err)
		}
		if s.json {
			_ = json.NewEncoder(stdout).Encode(map[string]any{"job_id": job.ID, "stream_seq": ack.Sequence})
		} else {
			fmt.Fprintln(stdout, job.ID)
		}
		return 0
	}

	st, _, err := bus.SubmitStream(ctx, s.prod, s.nc, job, bus.StreamOptions{})
	if err != nil {
		return submitError(stderr, err)
	}
	defer st.Close()
	enc := json.NewEncoder(stdout)
	for ev, err := range st.Events(ctx) {
		if err != nil {
			if errors.Is(err, context.Canceled) {
				fmt.Fprintf(stderr, "\nmlx-serving submit: interrupted; job %s keeps running (mlx-serving cancel %s)\n", job.ID, job.ID)
				return 130
			}
			fmt.Fprintf(stderr, "\nmlx-serving submit: %v\n", err)
			return exitFailed
		}
		if s.json {
			if ev.Token != nil {
				_ = enc.Encode(ev.Token)
			} else {
				_ = enc.Encode(ev.Result)
			}
		} else if ev.Token != nil {
			if ev.Rewind {
				// A terminal cannot take printed text back: say what happened.
				fmt.Fprintf(stderr, "\n[job %s restarted from the beginning after a failure; its text follows again]\n", job.ID)
				fmt.Fprint(stdout, "\n")
			}
			fmt.Fprint(stdout, ev.Token.Delta)
		}
		if ev.Result != nil {
			if !s.json {
				printResultFooter(stdout, stderr, ev.Result)
			}
			return statusExit(ev.Result.Status)
		}
	}
	return exitFailed
}

func printResultFooter(stdout, stderr io.Writer, r *schemas.ResultMsg) {
	fmt.Fprintln(stdout)
	line := fmt.Sprintf("[%s", r.Status)
	if r.FinishReason != "" {
		line += " " + r.FinishReason
	}
	line += fmt.Sprintf(" · %d prompt + %d completion tokens", r.Usage.PromptTokens, r.Usage.CompletionTokens)
	if r.Error != nil {
		line += fmt.Sprintf(" · %s: %s", r.Error.Code, r.Error.Message)
	}
	fmt.Fprintln(stderr, line+"]")
}

func submitError(stderr io.Writer, err error) int {
	var verr *schemas.ValidationError
	switch {
	case errors.As(err, &verr):
		fmt.Fprintf(stderr, "mlx-serving submit: %s\n", verr.Code)
		for _, v := range verr.Violations {
			fmt.Fprintf(stderr, "  %s: %s\n", v.Path, v.Reason)
		}
		return exitUsage
	case errors.Is(err, bus.ErrQueueFull):
		fmt.Fprintln(stderr, "mlx-serving submit: queue full: JOBS is at its limit; retry later")
	case errors.Is(err, bus.ErrDuplicate):
		fmt.Fprintf(stderr, "mlx-serving submit: duplicate: %v\n", err)
	default:
		fmt.Fprintf(stderr, "mlx-serving submit: %v\n", err)
	}
	return exitFailed
}

func cmdResult(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var tenant string
	s, code, ok := openClient(ctx, "result", args, stderr, func(fs *flagSet) {
		fs.StringVar(&tenant, "tenant", "", "the job's tenant (default: the producer credential's, else default)")
	})
	if !ok {
		return code
	}
	defer s.Close()
	if len(s.args) != 1 {
		fmt.Fprintln(stderr, "usage: mlx-serving result [flags] <job-id>")
		return exitUsage
	}
	if tenant == "" {
		tenant = credentialTenant(s.cfg.NATSUser)
	}
	r, err := s.prod.TenantResult(ctx, tenant, s.args[0])
	if errors.Is(err, bus.ErrNoResult) {
		fmt.Fprintf(stderr, "mlx-serving result: job %s has no result yet (unknown, queued or still running)\n", s.args[0])
		return exitNoResult
	}
	if err != nil {
		fmt.Fprintf(stderr, "mlx-serving result: %v\n", err)
		return exitFailed
	}
	if s.json {
		_ = json.NewEncoder(stdout).Encode(r)
		return 0
	}
	fmt.Fprintf(stdout, "job:      %s\nstatus:   %s\n", r.JobID, r.Status)
	if r.FinishReason != "" {
		fmt.Fprintf(stdout, "finish:   %s\n", r.FinishReason)
	}
	if r.Error != nil {
		fmt.Fprintf(stdout, "error:    %s: %s\n", r.Error.Code, r.Error.Message)
	}
	fmt.Fprintf(stdout, "attempts: %d\nusage:    %d prompt + %d completion = %d tokens\ntext:\n%s\n",
		r.Attempt, r.Usage.PromptTokens, r.Usage.CompletionTokens, r.Usage.TotalTokens, r.Text)
	return 0
}

func cmdCancel(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var reason, tenant string
	s, code, ok := openClient(ctx, "cancel", args, stderr, func(fs *flagSet) {
		fs.StringVar(&reason, "reason", "cancelled by user", "reason recorded with the cancel")
		fs.StringVar(&tenant, "tenant", "", "the job's tenant (default: the producer credential's, else default)")
	})
	if !ok {
		return code
	}
	defer s.Close()
	if len(s.args) != 1 {
		fmt.Fprintln(stderr, "usage: mlx-serving cancel [flags] <job-id>")
		return exitUsage
	}
	if tenant == "" {
		tenant = credentialTenant(s.cfg.NATSUser)
	}
	if err := s.prod.TenantCancel(ctx, tenant, s.args[0], reason); err != nil {
		fmt.Fprintf(stderr, "mlx-serving cancel: %v\n", err)
		return exitFailed
	}
	if s.json {
		_ = json.NewEncoder(stdout).Encode(map[string]string{"job_id": s.args[0], "status": "cancel_requested"})
	} else {
		fmt.Fprintf(stdout, "cancel requested for %s\n", s.args[0])
	}
	return 0
}

// credentialTenant is the tenant of a producer credential's user
// (producer-<tenant>), the only tenant whose replies and results it may read;
// "" (the default tenant) for any other user.
func credentialTenant(natsUser string) string {
	tenant, ok := strings.CutPrefix(natsUser, string(auth.RoleProducer)+"-")
	if !ok {
		return ""
	}
	return tenant
}
