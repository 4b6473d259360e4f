package gateway

import (
	"fmt"
	"net/http"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// Logprob entries a request's answer holds.
//
// A request with logprobs keeps every entry of its answer until it ends
// (bus.JobStream.Logprobs: each token with its alternatives, their bytes as
// []int), whether it streams or not: four ~200-byte requests of n 8,
// max_tokens 2000, top_logprobs 20 took the standalone gateway from 24 MB to
// 528 MB (264 MB streamed), and on a 32k-context model one such request
// would take gigabytes — for every tenant of the gateway (red team round 17,
// HTTP M2). So each request with logprobs is charged, before it is
// submitted, what its answer can hold at most — n × max_tokens × (1 +
// top_logprobs) entries at logprobEntryBytes — against a gateway-wide budget
// with a per-tenant share (the body budget's kind: bodybudget.go). A request
// over the share can never fit and is refused as invalid (400
// logprobs_too_large); one that does not fit now waits for nobody and is
// refused with 429 logprobs_budget_full, like a full queue.

const (
	// logprobEntryBytes is what one entry (a token or an alternative) costs
	// while held, rounded up from the red team's measurement: 1,344,000
	// entries held took ~504 MB above idle (~375 bytes each).
	logprobEntryBytes = 384
	// logprobCapacity bounds the logprob entries of all requests at once; a
	// tenant may hold a quarter (bodyShares) of it: 64 MiB, ~174,000 entries
	// (top_logprobs 20 for up to ~8,300 tokens, 5 for ~29,000).
	logprobCapacity = 256 << 20

	codeLogprobsTooLarge   = "logprobs_too_large"
	codeLogprobsBudgetFull = "logprobs_budget_full"
)

// logprobBytes is what the answer of job, n choices, can hold of logprob
// entries at most; 0 when it asks for none.
func logprobBytes(job *schemas.JobRequest, n int) int64 {
	if job.Logprobs == nil {
		return 0
	}
	tokens := job.MaxTokens
	if tokens <= 0 {
		tokens = schemas.DefaultMaxTokens
	}
	return int64(max(n, 1)) * int64(tokens) * int64(1+*job.Logprobs) * logprobEntryBytes
}

// holdLogprobs charges what the answer of job can hold of logprob entries to
// its tenant, or says why not; release gives it back.
func (g *Gateway) holdLogprobs(job *schemas.JobRequest, n int, endpoint string) (release func(), aerr *apiError) {
	need := logprobBytes(job, n)
	if need == 0 {
		return func() {}, nil
	}
	param := "top_logprobs"
	if endpoint == endpointCompletions {
		param = "logprobs"
	}
	if need > g.logprobs.share {
		return nil, &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: param, Code: codeLogprobsTooLarge,
			Message: fmt.Sprintf("n × max_tokens × (1 + %s) is %d logprob entries; a request may ask for at most %d. Ask for fewer tokens, choices or alternatives.",
				param, need/logprobEntryBytes, g.logprobs.share/logprobEntryBytes)}
	}
	if g.logprobs.charge(job.Tenant, need) != bodyFits {
		return nil, &apiError{Status: http.StatusTooManyRequests, Type: typeRateLimit, Param: param, Code: codeLogprobsBudgetFull, RetryAfter: g.cfg.RetryAfter,
			Message: "Too many requests with logprobs are being answered now; retry later."}
	}
	return func() { g.logprobs.refund(job.Tenant, need) }, nil
}
