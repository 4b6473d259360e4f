package jsprov

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Provision's requests are tried again while the failure is one a forming
// cluster gives (no answer within the try, the system temporarily
// unavailable), and not for any other: against a three-node cluster just
// started, Provision waited its whole 2 minutes on one unanswered request
// (a clean-clone CI run, session 13).
// Mutation caught: transient answering false (the first failure is final).
func TestRetryAPITriesAgainOnlyWhatAFormingClusterGives(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	calls := 0
	err := retryAPI(ctx, func(context.Context) error {
		calls++
		switch calls {
		case 1:
			return fmt.Errorf("provision: %w", context.DeadlineExceeded) // this try's own deadline
		case 2:
			return &jetstream.APIError{Code: 503, ErrorCode: jsClusterNotAvailable, Description: "JetStream system temporarily unavailable"}
		}
		return nil
	})
	if err != nil || calls != 3 {
		t.Fatalf("err %v after %d calls; want nil after 3", err, calls)
	}
	calls = 0
	bad := &jetstream.APIError{Code: 400, ErrorCode: jetstream.JSErrCodeBadRequest, Description: "bad"}
	if err := retryAPI(ctx, func(context.Context) error { calls++; return bad }); !errors.Is(err, bad) || calls != 1 {
		t.Fatalf("a refusal: err %v after %d calls; want it at once", err, calls)
	}
	done, stop := context.WithCancel(context.Background())
	stop()
	calls = 0
	if err := retryAPI(done, func(context.Context) error { calls++; return context.DeadlineExceeded }); err == nil || calls != 1 {
		t.Fatalf("an ended context: err %v after %d calls; want an error at once", err, calls)
	}
}
