package bus

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// FuzzJobStreamAccept feeds a job's reply subject a sequence of messages (one per
// line of the input) as any publisher could send them, and checks what callers
// of JobStream rely on: no panic, every accepted event is this job's and is
// either a delta or a terminal, the loss counts never go negative, and a
// schema-valid delta of a newer attempt is never dropped. The seeds are the
// token event and result vectors of schemas/testdata, alone and in pairs.
func FuzzJobStreamAccept(f *testing.F) {
	var docs [][]byte
	for _, dir := range []string{"token_event/valid", "token_event/invalid", "result/valid", "result/invalid"} {
		paths, err := filepath.Glob(filepath.Join("..", "schemas", "testdata", dir, "*.json"))
		if err != nil || len(paths) == 0 {
			f.Fatalf("vectors %s: %v", dir, err)
		}
		for _, p := range paths {
			raw, err := os.ReadFile(p)
			if err != nil {
				f.Fatal(err)
			}
			docs = append(docs, compact(raw))
		}
	}
	// The token events at and over the delta limit (64 KiB, 196 KiB in threes) take
	// 2 to 14 ms a run against ~0.2 ms for the rest, so shrinking a mutant of one
	// (see the fuzz task: 1000 runs) held a worker for 2 to 14 s. They stay seeds
	// and are checked whole; any other input is checked on its first fuzzMaxInput
	// bytes (cut, not skipped: a skip would be a branch no seed takes, new coverage
	// that only the input's length keeps).
	const fuzzMaxInput = 4 << 10
	large := map[string]bool{}
	add := func(in []byte) {
		f.Add(in)
		if len(in) > fuzzMaxInput {
			large[string(in)] = true
		}
	}
	for i, d := range docs {
		add(d)
		add(bytes.Join([][]byte{d, docs[(i+1)%len(docs)], d}, []byte("\n")))
	}
	// Found by this fuzzer: a seq near the integer maximum overflowed the gap count.
	f.Add([]byte(`{"type":"token","job_id":"j","attempt":1,"seq":9223372036854775807,"delta":"a","tokens":1}` + "\n" +
		`{"type":"token","job_id":"j","attempt":1,"seq":0,"delta":"b","tokens":1}`))

	f.Fuzz(func(t *testing.T, in []byte) {
		if !large[string(in)] {
			in = in[:min(len(in), fuzzMaxInput)]
		}
		lines := bytes.Split(in, []byte("\n"))
		// The stream is for the job the first message names, so the seeds'
		// events are accepted rather than all dropped as another job's.
		var first struct {
			JobID string `json:"job_id"`
		}
		_ = json.Unmarshal(lines[0], &first)
		s := &JobStream{jobID: first.JobID}
		for _, line := range lines {
			before := s.attempt
			ev, ok := s.accept(line)
			if !ok {
				var tok schemas.TokenEventMsg
				if schemas.Validate(schemas.TokenEvent, line) == nil && json.Unmarshal(line, &tok) == nil &&
					tok.JobID == s.jobID && tok.Attempt > before {
					t.Fatalf("valid delta of a newer attempt (%d > %d) dropped: %s", tok.Attempt, before, line)
				}
				continue
			}
			if (ev.Token == nil) == (ev.Result == nil) {
				t.Fatalf("accepted event is not exactly one of delta and terminal: %+v", ev)
			}
			if ev.Token != nil && ev.Token.JobID != s.jobID || ev.Result != nil && ev.Result.JobID != s.jobID {
				t.Fatalf("accepted another job's event: %s", line)
			}
			if ev.Missed < 0 || s.missed < 0 {
				t.Fatalf("negative loss count (event %d, stream %d) after %s", ev.Missed, s.missed, line)
			}
		}
	})
}

func compact(raw []byte) []byte {
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		return bytes.ReplaceAll(raw, []byte("\n"), nil)
	}
	return b.Bytes()
}
