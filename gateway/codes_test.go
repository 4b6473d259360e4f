package gateway

import (
	"net/http"
	"testing"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// TestResultAnswersCoverCodes: the gateway maps exactly the wire codes that exist.
func TestResultAnswersCoverCodes(t *testing.T) {
	t.Parallel()
	exist := map[string]bool{}
	for _, c := range schemas.Codes() {
		exist[c.Code] = true
		if _, ok := resultAnswers[c.Code]; !ok {
			t.Errorf("wire code %q has no HTTP answer in resultAnswers", c.Code)
		}
	}
	for code := range resultAnswers {
		if !exist[code] {
			t.Errorf("resultAnswers maps %q, which is not in schemas/codes/errors.json", code)
		}
	}
}

func TestAnswerFor(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		code       string
		status     int
		typ, apiCd string
	}{
		{schemas.CodeInvalidSchema, http.StatusBadRequest, typeInvalidRequest, "invalid_schema"},
		{schemas.CodeContextExceeded, http.StatusBadRequest, typeInvalidRequest, "context_length_exceeded"},
		{schemas.CodeDeadlineExceeded, http.StatusGatewayTimeout, typeTimeout, "deadline_exceeded"},
		{schemas.CodeModelNotAvailable, http.StatusServiceUnavailable, typeServer, "model_not_available"},
		{schemas.CodeRuntimeBusy, http.StatusServiceUnavailable, typeServer, "runtime_busy"}, // retryable (round 17, HTTP L4)
		{schemas.CodeRuntimeCrashed, http.StatusInternalServerError, typeServer, "runtime_crashed"},
		{"from_a_newer_worker", http.StatusInternalServerError, typeServer, "from_a_newer_worker"},
		{"", http.StatusInternalServerError, typeServer, "job_failed"},
	} {
		e := answerFor(tc.code, "m")
		if e.Status != tc.status || e.Type != tc.typ || e.Code != tc.apiCd || e.Message != "m" {
			t.Errorf("answerFor(%q) = %+v, want %d %s %s", tc.code, e, tc.status, tc.typ, tc.apiCd)
		}
	}
}
