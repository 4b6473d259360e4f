package gateway

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/gateway/gatewaybus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
)

// FuzzRequestBody posts arbitrary bodies to both completion endpoints of a real
// gateway on a real bus with no worker, so nothing is ever queued. Property: no
// panic, and every body gets an OpenAI-format error with a type and a code: 400
// (or 413) for what the client got wrong, 404 model_not_found for a request
// that would have been queued (no worker ever announced a model). A 500 would mean a body the gateway maps to a job
// it then finds invalid itself. Seeds: the job vectors of schemas/testdata (they
// share most fields with OpenAI bodies) and hand-written OpenAI bodies.
func FuzzRequestBody(f *testing.F) {
	paths, err := filepath.Glob(filepath.Join("..", "schemas", "testdata", "job", "*", "*.json"))
	if err != nil || len(paths) == 0 {
		f.Fatalf("job vectors: %v", err)
	}
	// The job vectors at and over the size limits (256 KiB prompts, 257 messages)
	// take 3 to 6 ms a run against ~0.3 ms for the rest, so shrinking a mutant of
	// one (see the fuzz task: 1000 runs) held a worker for 3 to 6 s. They stay
	// seeds and are posted whole; any other body is posted cut to fuzzMaxInput bytes
	// (cut, not skipped: a skip would be a branch no seed takes, new coverage that
	// only the body's length keeps).
	const fuzzMaxInput = 4 << 10
	large := map[string]bool{}
	for _, p := range paths {
		raw, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(raw)
		if len(raw) > fuzzMaxInput {
			large[string(raw)] = true
		}
	}
	for _, s := range []string{
		`{"model":"m","messages":[{"role":"user","content":"hi"}]}`,
		`{"model":"m","prompt":"hi","max_tokens":0}`,
		`{"model":"m","prompt":["a","b"]}`,
		`{"model":"m","messages":[{"role":"developer","content":[{"type":"text","text":"x"},{"type":"image_url"}]}]}`,
		`{"model":"m","messages":[{"role":"user","content":"hi"}],"stop":"","response_format":{"type":"json_schema","json_schema":{"schema":{"type":"object"}}}}`,
		`{"model":"m","messages":[{"role":"user","content":"hi"}],"user":"` + strings.Repeat("u", 300) + `"}`,
		`{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":-1,"seed":-5,"n":2}`,
		`{"model":"` + strings.Repeat("m", 300) + `","prompt":"x"}`,
		`[]`, `null`, `{"model":1}`, ``,
	} {
		f.Add([]byte(s))
	}

	b := testenv.StartBus(f, jsprov.Options{})
	gb, err := gatewaybus.New(b.Conn, gatewaybus.Options{})
	if err != nil {
		f.Fatal(err)
	}
	g, err := New(Config{Jobs: gb, Fleet: gb.Fleet(), Logger: zerolog.Nop(), RequestTimeout: 5 * time.Second})
	if err != nil {
		f.Fatal(err)
	}
	h := g.Handler()

	f.Fuzz(func(t *testing.T, body []byte) {
		if !large[string(body)] {
			body = body[:min(len(body), fuzzMaxInput)]
		}
		for _, path := range []string{"/v1/chat/completions", "/v1/completions"} {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, path, bytes.NewReader(body)))
			var e openAIError
			if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil {
				t.Fatalf("%s: %d with a body that is not an OpenAI error: %v\n%s", path, rec.Code, err, rec.Body.Bytes())
			}
			code := ""
			if e.Error.Code != nil {
				code = *e.Error.Code
			}
			if e.Error.Message == "" || e.Error.Type == "" || code == "" {
				t.Fatalf("%s: %d error without message, type or code: %s", path, rec.Code, rec.Body.Bytes())
			}
			switch {
			case rec.Code == http.StatusBadRequest, rec.Code == http.StatusRequestEntityTooLarge:
			case rec.Code == http.StatusNotFound && code == "model_not_found":
			case rec.Code == http.StatusServiceUnavailable && code == "model_not_available": // no worker at all: an outage
			default:
				t.Fatalf("%s: %d %s for body %q", path, rec.Code, rec.Body.Bytes(), body)
			}
		}
	})
}
