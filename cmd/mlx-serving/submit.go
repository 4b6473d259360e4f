package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/mlx-serving/mlx-serving/auth"
	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// statusExit is submit's exit code for a job's terminal status.
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

type submitOptions struct {
	model, messages, id, priority, tenant, stop, schemaFile string
	maxTokens                                               int
	temperature, topP                                       float64
	seed                                                    int64
	detach, allowUnserved                                   bool
	timeout                                                 time.Duration
}

func (a *app) submitCmd() *cobra.Command {
	var o submitOptions
	cmd := &cobra.Command{
		Use:   "submit [flags] [prompt...]",
		Short: "submit a job and stream its tokens (prompt from args or stdin)",
		Long: `Submit a job and stream its tokens to stdout; the footer (status, usage) goes to
stderr. The prompt is the arguments joined by spaces, else --messages, else stdin.
Flags may come before, between or after the prompt's words; put -- before a
prompt word that starts with a dash.

The exit code is the job's terminal status: 0 completed, 1 failed, 2 invalid,
4 cancelled, 5 expired; 6 when the job was accepted but its end could not be
waited for (it runs on: mlx-serving result ID). The wait rides out NATS
restarts. Given an --id already submitted, nothing runs again: the job's
result is printed (or 6 while it still runs). See 'mlx-serving --help'.`,
		Example: `  mlx-serving submit -m tiny "Tell me a story"
  mlx-serving submit "hello" -m tiny --max-tokens 3 --json
  echo "from stdin" | mlx-serving submit --detach`,
		ValidArgsFunction: cobra.NoFileCompletions,
	}
	cf := addClientFlags(cmd)
	f := cmd.Flags()
	f.StringVarP(&o.model, "model", "m", "tiny", "model id")
	f.StringVar(&o.messages, "messages", "", `chat messages as JSON, e.g. '[{"role":"user","content":"hi"}]'`)
	f.StringVar(&o.id, "id", "", "job id (default: a new ULID); resubmitting an id runs nothing: it prints the job's result, or says it still runs (exit 6)")
	f.StringVar(&o.priority, "priority", schemas.PriorityNormal, strings.Join(schemas.Priorities, ", "))
	f.StringVar(&o.tenant, "tenant", "", "the job's tenant (default: the producer credential's, else default)")
	f.StringVar(&o.stop, "stop", "", "stop sequences, comma-separated")
	f.StringVar(&o.schemaFile, "json-schema", "", "file with a JSON schema the output must follow")
	f.IntVar(&o.maxTokens, "max-tokens", 0, "most tokens to generate (0: until a stop, EOS or the end of the context, at most "+strconv.Itoa(schemas.DefaultMaxTokens)+")")
	f.Float64Var(&o.temperature, "temperature", 0, "sampling temperature (0 = greedy)")
	f.Float64Var(&o.topP, "top-p", 1, "nucleus sampling")
	f.Int64Var(&o.seed, "seed", -1, "sampling seed (-1: none)")
	f.BoolVar(&o.detach, "detach", false, "print the job id and return without waiting")
	f.BoolVar(&o.allowUnserved, "allow-unserved", false, "queue the job even when no worker serves its model (exit 7 otherwise); it is dead-lettered if none comes")
	f.DurationVar(&o.timeout, "timeout", 0, "deadline for the job, e.g. 30s (0: none)")
	_ = cmd.RegisterFlagCompletionFunc("priority", cobra.FixedCompletions(schemas.Priorities, cobra.ShellCompDirectiveNoFileComp))
	_ = cmd.MarkFlagFilename("json-schema", "json")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		return exitWith(a.submit(cmd.Context(), cf, o, args))
	}
	return cmd
}

func (a *app) submit(ctx context.Context, cf *clientFlags, o submitOptions, args []string) int {
	stdout, stderr := a.stdout, a.stderr
	reconnects := -1 // waiting for the job: through server restarts, until interrupted
	if o.detach {
		reconnects = 3
	}
	s, code, ok := a.openClientReconnecting(ctx, "submit", cf, reconnects)
	if !ok {
		return code
	}
	defer s.Close()

	if o.tenant == "" {
		o.tenant = credentialTenant(s.cfg.NATSUser)
	}
	if o.allowUnserved {
		var err error
		if s.prod, err = bus.NewClient(s.nc, bus.WithoutModelCheck()); err != nil {
			fmt.Fprintf(stderr, "mlx-serving submit: %v\n", err)
			return exitFailed
		}
	}
	job := &schemas.JobRequest{ID: o.id, Model: o.model, MaxTokens: o.maxTokens, Priority: o.priority, Tenant: o.tenant}
	if o.temperature != 0 {
		job.Temperature = &o.temperature
	}
	if o.topP != 1 {
		job.TopP = &o.topP
	}
	if o.seed >= 0 {
		job.Seed = &o.seed
	}
	if o.stop != "" {
		job.Stop = strings.Split(o.stop, ",")
	}
	if o.timeout > 0 {
		d := time.Now().Add(o.timeout).UTC()
		job.Deadline = &d
	}
	if o.schemaFile != "" {
		raw, err := os.ReadFile(o.schemaFile)
		if err == nil {
			err = json.Unmarshal(raw, &job.JSONSchema)
		}
		if err != nil {
			fmt.Fprintf(stderr, "mlx-serving submit: --json-schema: %v\n", err)
			return exitUsage
		}
	}
	switch {
	case o.messages != "":
		if err := json.Unmarshal([]byte(o.messages), &job.Messages); err != nil {
			fmt.Fprintf(stderr, "mlx-serving submit: --messages: %v\n", err)
			return exitUsage
		}
	case len(args) > 0:
		job.Prompt = strings.Join(args, " ")
	default:
		raw, err := io.ReadAll(os.Stdin)
		if err != nil {
			fmt.Fprintf(stderr, "mlx-serving submit: reading stdin: %v\n", err)
			return exitUsage
		}
		job.Prompt = string(raw)
	}

	if o.detach {
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

	if job.Deadline != nil {
		// The wait reconnects through outages, but not past the job's own end:
		// by its deadline and a grace the dispatcher has ended it (expired at
		// worst); a server still away by then gets exit 6 and the way to ask.
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, job.Deadline.Add(submitGrace))
		defer cancel()
	}
	st, _, err := bus.SubmitStream(ctx, s.prod, s.nc, job, bus.StreamOptions{})
	if err != nil {
		if errors.Is(err, bus.ErrDuplicate) && o.id != "" {
			return a.submittedBefore(ctx, s, job, err)
		}
		return submitError(stderr, err)
	}
	defer st.Close()
	enc := json.NewEncoder(stdout)
	for ev, err := range st.Events(ctx) {
		if err != nil {
			if errors.Is(err, context.Canceled) {
				fmt.Fprintf(stderr, "\nmlx-serving submit: interrupted; job %s keeps running (mlx-serving cancel %s)\n", job.ID, job.ID)
				return exitInterrupted
			}
			// Accepted, so it runs on and ends with its record whatever
			// became of this wait: not "failed".
			if errors.Is(err, context.DeadlineExceeded) && job.Deadline != nil {
				fmt.Fprintf(stderr, "\nmlx-serving submit: no result by the job's deadline and %v of grace (the server unreachable or the queue behind); it ends expired at worst: mlx-serving result %s\n", submitGrace, job.ID)
				return exitNoResult
			}
			fmt.Fprintf(stderr, "\nmlx-serving submit: %v\njob %s was accepted and keeps running: mlx-serving result %s\n", err, job.ID, job.ID)
			return exitNoResult
		}
		if s.json {
			if ev.Token != nil {
				_ = enc.Encode(ev.Token)
			} else {
				_ = enc.Encode(ev.Result)
			}
		} else {
			if ev.Drop.Any() {
				// A terminal cannot take printed text back: say what happened.
				fmt.Fprintf(stderr, "\n[job %s: the last %d characters above are replaced by what follows (a retry generated other text)]\n", job.ID, ev.Drop.Chars)
				fmt.Fprint(stdout, "\n")
			}
			if ev.Token != nil {
				fmt.Fprint(stdout, ev.Token.Delta)
			} else {
				fmt.Fprint(stdout, ev.Rest) // text whose events were lost on the way
			}
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

// submitGrace is how long past a job's deadline submit still waits for its end
// (a variable for tests).
var submitGrace = 30 * time.Second

// submittedBefore answers a submit whose chosen id was taken (dup, the
// submit's ErrDuplicate): a retry of a submit whose wait was lost gets the
// job's result when it has one, as if it had waited (exit by its status), and
// is told the job still runs otherwise (exit 6). Another job under the same
// id answers the same way: an id names one job.
func (a *app) submittedBefore(ctx context.Context, s *clientSession, job *schemas.JobRequest, dup error) int {
	stdout, stderr := a.stdout, a.stderr
	r, err := s.prod.TenantResult(ctx, job.Tenant, job.ID)
	switch {
	case errors.Is(err, bus.ErrNoResult):
		fmt.Fprintf(stderr, "mlx-serving submit: job %s was submitted before and has no result yet (queued or running): mlx-serving result %s\n", job.ID, job.ID)
		return exitNoResult
	case err != nil:
		return submitError(stderr, fmt.Errorf("%w; reading its result: %w", dup, err))
	}
	fmt.Fprintf(stderr, "mlx-serving submit: job %s was submitted before; its result:\n", job.ID)
	if s.json {
		_ = json.NewEncoder(stdout).Encode(r)
	} else {
		fmt.Fprint(stdout, r.Text)
		printResultFooter(stdout, stderr, r)
	}
	return statusExit(r.Status)
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
	case errors.Is(err, bus.ErrModelNotServed):
		fmt.Fprintf(stderr, "mlx-serving submit: model_not_found: %v\n", err)
		return exitNoModel
	case errors.Is(err, bus.ErrQueueFull):
		fmt.Fprintln(stderr, "mlx-serving submit: queue full: JOBS is at its limit; retry later")
	case errors.Is(err, bus.ErrDuplicate):
		fmt.Fprintf(stderr, "mlx-serving submit: duplicate: %v\n", err)
	default:
		fmt.Fprintf(stderr, "mlx-serving submit: %v\n", err)
	}
	return exitFailed
}

func (a *app) resultCmd() *cobra.Command {
	var tenant string
	cmd := &cobra.Command{
		Use:   "result [flags] <job-id>",
		Short: "print a job's durable terminal result",
		Long: `Print a job's durable terminal result, even after restarts. Exits 6 when the
job has none yet (unknown, queued or still running).`,
		Args:              oneJobID,
		ValidArgsFunction: cobra.NoFileCompletions,
	}
	cf := addClientFlags(cmd)
	cmd.Flags().StringVar(&tenant, "tenant", "", "the job's tenant (default: the producer credential's, else default)")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		return exitWith(a.result(cmd.Context(), cf, tenant, args[0]))
	}
	return cmd
}

func (a *app) result(ctx context.Context, cf *clientFlags, tenant, jobID string) int {
	stdout, stderr := a.stdout, a.stderr
	s, tenant, code, ok := a.openTenantClient(ctx, "result", cf, tenant)
	if !ok {
		return code
	}
	defer s.Close()
	rctx, done := s.refusable(ctx)
	defer done()
	r, err := s.prod.TenantResult(rctx, tenant, jobID)
	if v := denied(rctx); err != nil && v != nil {
		fmt.Fprintf(stderr, "mlx-serving result: credential %q may not read the jobs of tenant %q (%v)\n", s.cfg.NATSUser, tenantName(tenant), v)
		return exitFailed
	}
	if errors.Is(err, bus.ErrNoResult) {
		fmt.Fprintf(stderr, "mlx-serving result: job %s has no result yet (unknown, queued or still running)\n", jobID)
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

func (a *app) cancelCmd() *cobra.Command {
	var reason, tenant string
	cmd := &cobra.Command{
		Use:               "cancel [flags] <job-id>",
		Short:             "cancel a queued or running job",
		Args:              oneJobID,
		ValidArgsFunction: cobra.NoFileCompletions,
	}
	cf := addClientFlags(cmd)
	cmd.Flags().StringVar(&reason, "reason", "cancelled by user", "reason recorded with the cancel")
	cmd.Flags().StringVar(&tenant, "tenant", "", "the job's tenant (default: the producer credential's, else default)")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		return exitWith(a.cancel(cmd.Context(), cf, reason, tenant, args[0]))
	}
	return cmd
}

func (a *app) cancel(ctx context.Context, cf *clientFlags, reason, tenant, jobID string) int {
	stdout, stderr := a.stdout, a.stderr
	s, tenant, code, ok := a.openTenantClient(ctx, "cancel", cf, tenant)
	if !ok {
		return code
	}
	defer s.Close()
	rctx, done := s.refusable(ctx)
	defer done()
	if err := s.prod.TenantCancel(rctx, tenant, jobID, reason); err != nil {
		if v := denied(rctx); v != nil {
			fmt.Fprintf(stderr, "mlx-serving cancel: credential %q may not cancel the jobs of tenant %q (%v)\n", s.cfg.NATSUser, tenantName(tenant), v)
			return exitFailed
		}
		fmt.Fprintf(stderr, "mlx-serving cancel: %v\n", err)
		return exitFailed
	}
	if s.json {
		_ = json.NewEncoder(stdout).Encode(map[string]string{"job_id": jobID, "status": "cancel_requested"})
	} else {
		fmt.Fprintf(stdout, "cancel requested for %s\n", jobID)
	}
	return 0
}

// tenantName names tenant for a message: "" is the default tenant.
func tenantName(tenant string) string {
	if tenant == "" {
		return "default"
	}
	return tenant
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
