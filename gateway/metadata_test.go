package gateway

import (
	"net/http"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
)

// Client metadata keys with the reserved mlx_ prefix are refused with the
// standard invalid-request answer naming the key, and nothing is queued: the
// dispatcher reads them as operator instructions (mlx_attempt_base numbers the
// job's attempts; 100 made a job that never ended). Other keys still pass.
// Mutation caught: toJob without checkReservedMetadata (200, the job queued).
func TestChatRefusesReservedMetadata(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	startFakeWorker(t, tb, fakeworker.Plan{Tokens: helloTokens})
	_, srv := newTestGateway(t, tb, nil)

	for _, body := range []string{
		`{"model":"` + testModel + `","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"metadata":{"mlx_attempt_base":"100"}}`,
		`{"model":"` + testModel + `","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"metadata":{"trace":"t","mlx_zz":"1","mlx_attempt_base":"7"}}`,
	} {
		e := expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", body), http.StatusBadRequest, "metadata.mlx_attempt_base", "invalid_value")
		if e.Error.Type != typeInvalidRequest {
			t.Fatalf("type %q", e.Error.Type)
		}
	}
	if n := jobsStored(t, tb); n != 0 {
		t.Fatalf("JOBS holds %d messages after refused requests, want 0", n)
	}

	resp := postJSON(t, srv.URL+"/v1/chat/completions",
		`{"model":"`+testModel+`","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"metadata":{"mlx":"ok","x_mlx_y":"ok"}}`)
	if resp.StatusCode != http.StatusOK {
		expectError(t, resp, http.StatusOK, "", "")
	}
}

// jobsStored is how many messages JOBS holds.
func jobsStored(t *testing.T, tb *testBus) uint64 {
	t.Helper()
	s, err := tb.js.Stream(t.Context(), subjects.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}
