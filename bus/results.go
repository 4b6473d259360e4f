package bus

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go/jetstream"
)

// ResultMsgID is the Nats-Msg-Id of a job's terminal record: job id, attempt and
// finish time. A retried publish of the same record is deduplicated; a new record
// for a replayed job (its old one purged) is not mistaken for one, even inside the
// duplicate window and with the same attempt number.
func ResultMsgID(r *schemas.ResultMsg) string {
	return r.JobID + "." + strconv.Itoa(r.Attempt) + "." + strconv.FormatInt(r.FinishedAt.UnixNano(), 10)
}

// RecordResult writes r as the job's one terminal record in RESULTS, first writer
// wins. It returns nil when this record is the stored one, and an error matching
// ErrResultExists when another record got there first: the caller then must not
// send a terminal event. A retry of the very same record (say after a lost ack)
// returns nil, since the stored record is byte-for-byte the caller's.
func RecordResult(ctx context.Context, js jetstream.JetStream, r *schemas.ResultMsg) error {
	if r == nil || r.JobID == "" {
		return errors.New("bus: RecordResult: result with a job id required")
	}
	data, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("bus: marshal result %s: %w", r.JobID, err)
	}
	if err := schemas.Validate(schemas.Result, data); err != nil {
		return err
	}
	ack, err := js.Publish(ctx, ResultSubject(r.JobID), data,
		jetstream.WithMsgID(ResultMsgID(r)),
		jetstream.WithExpectStream(StreamResults),
		jetstream.WithExpectLastSequencePerSubject(0),
	)
	if err == nil && !ack.Duplicate {
		return nil
	}
	if err != nil && !resultRefused(err) {
		return mapPublishError(err, "record result "+r.JobID)
	}
	// Someone's record is stored. It may be our own from an earlier try.
	stored, gerr := lastMsg(ctx, js, StreamResults, ResultSubject(r.JobID))
	if gerr == nil && bytes.Equal(stored.Data, data) {
		return nil
	}
	return fmt.Errorf("%w: job %s", ErrResultExists, r.JobID)
}

// resultRefused reports the server's ways of saying the subject already has a record.
func resultRefused(err error) bool {
	if ae, ok := apiError(err); ok {
		switch ae.ErrorCode {
		case jsErrWrongLastSequence, jsErrWrongLastSequenceConstant:
			return true
		}
	}
	return storeRefusal(err) == storeErrMaxMsgsPerSubject
}

// FetchResult returns the job's terminal record, or an error matching ErrNoResult
// when it has none.
func FetchResult(ctx context.Context, js jetstream.JetStream, jobID string) (*schemas.ResultMsg, error) {
	m, err := lastMsg(ctx, js, StreamResults, ResultSubject(jobID))
	if err != nil {
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return nil, fmt.Errorf("%w: job %s", ErrNoResult, jobID)
		}
		return nil, mapPublishError(err, "fetch result "+jobID)
	}
	var r schemas.ResultMsg
	if err := json.Unmarshal(m.Data, &r); err != nil {
		return nil, fmt.Errorf("bus: decode result %s: %w", jobID, err)
	}
	return &r, nil
}

// PurgeResult removes the job's terminal record, so a replayed job can record a new one.
func PurgeResult(ctx context.Context, js jetstream.JetStream, jobID string) error {
	s, err := js.Stream(ctx, StreamResults)
	if err != nil {
		return mapPublishError(err, "purge result "+jobID)
	}
	if err := s.Purge(ctx, jetstream.WithPurgeSubject(ResultSubject(jobID))); err != nil {
		return fmt.Errorf("bus: purge result %s: %w", jobID, err)
	}
	return nil
}

func lastMsg(ctx context.Context, js jetstream.JetStream, stream, subject string) (*jetstream.RawStreamMsg, error) {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return nil, err
	}
	return s.GetLastMsgForSubject(ctx, subject)
}

// mapPublishError turns client and server errors into the package's sentinels,
// keeping the original error in the chain.
func mapPublishError(err error, what string) error {
	switch {
	case err == nil:
		return nil
	case isDisconnected(err):
		return fmt.Errorf("bus: %s: %w: %w", what, ErrNotConnected, err)
	case isNoStream(err):
		return fmt.Errorf("bus: %s: %w: %w", what, ErrNoStream, err)
	}
	return fmt.Errorf("bus: %s: %w", what, err)
}
