package dispatcher

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// fuzzCap bounds a mutated input (seeds are checked whole): past it, the
// engine's minimizer spends minutes on one input (see the Taskfile fuzz task).
const fuzzCap = 4096

// FuzzIntake feeds the dispatcher's intake any subject and body a JOBS message
// can carry. Whatever arrives, it ends: either it is no job (then its raw dead
// letter passes its schema) or its failure record passes the result schema
// (else results.Record would refuse it and the job be redelivered for ever); an
// accepted job is the subject's job, of the subject's tenant, replying inside
// the tenant's namespace.
// Mutations caught: dropping the model check or the message clip in
// terminalRecord (seeds 2 and 9 fail at once).
func FuzzIntake(f *testing.F) {
	good := `{"id":"j1","tenant":"a","model":"m","prompt":"hi","reply_to":"mlx.reply.a.j1"}`
	for _, s := range []struct{ subject, body string }{
		{"mlx.jobs.a.normal.j1", good},
		{"mlx.jobs.a.normal.j1", `{"id":"j1","tenant":"b","model":"m","prompt":"hi","reply_to":"mlx.reply.b.j1"}`},
		{"mlx.jobs.a.normal.j1", `{"id":"j1","tenant":"a","model":"` + strings.Repeat("m", 300) + `","prompt":"hi","reply_to":"mlx.reply.a.j1"}`},
		{"mlx.jobs.a.normal.j1", `{"id":"j1","model":"a b","prompt":"` + strings.Repeat("x", 3000) + `","stop":["` + strings.Repeat("y", 600) + `"]}`},
		{"mlx.jobs.a.normal.*", good},
		{"mlx.jobs.a.normal.>", "{nope"},
		{"mlx.jobs.*.high.x", ""},
		{"mlx.jobs." + strings.Repeat("t", 5000) + ".low.x", "\xff"},
		{"mlx.jobs.default.low.x", `{"id":"x","model":"m","prompt":"p","reply_to":"mlx.reply.default.x"}`},
		{"mlx.jobs.a.high.many", manyProps(300)},
	} {
		f.Add(s.subject, []byte(s.body))
	}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, subject string, data []byte) {
		if len(data) > fuzzCap {
			data = data[:fuzzCap]
		}
		ref, _, ok := subjects.ParseJob(subject)
		if !ok {
			rec := rawDeadLetter(subject, data, "d1", now)
			raw, _ := json.Marshal(rec)
			if err := schemas.Validate(schemas.DLQRecord, raw); err != nil {
				t.Fatalf("raw dead letter of %q breaks its schema: %v", subject, err)
			}
			return
		}
		req, invalid := decodeJob(ref, data)
		if invalid == nil {
			if req.ID != ref.ID || !subjects.ReplyInTenant(ref.Tenant, req.ReplyTo) || (subjects.JobRef{Tenant: req.Tenant}.Key() != subjects.JobRef{Tenant: ref.Tenant}.Key()) {
				t.Fatalf("accepted %+v on %s", req, subject)
			}
			return
		}
		j := &job{id: ref.ID, tenant: ref.Tenant, req: req, attempt: 1}
		res := terminalRecord(j, EvFailed, schemas.StatusFailed, &schemas.ErrorInfo{Code: schemas.CodeInvalidRequest, Message: invalid.Error()}, now)
		raw, _ := json.Marshal(res)
		if err := schemas.Validate(schemas.Result, raw); err != nil {
			t.Fatalf("failure record of %q breaks the result schema: %v\n%s", subject, err, raw)
		}
		if j.replyTo() != "" && !subjects.ReplyInTenant(ref.Tenant, j.replyTo()) {
			t.Fatalf("terminal event would go to %q outside tenant %s", j.replyTo(), ref.Tenant)
		}
	})
}

// FuzzWorkerMessages feeds the dispatcher's decoders of what workers send:
// assignment replies, terminal hand-overs, attempt reports, and cancels. What
// they accept passes its schema and names a worker from the subject.
func FuzzWorkerMessages(f *testing.F) {
	f.Add("mlx.worker.w1.done.d1", []byte(`{"type":"result","job_id":"j","attempt":1,"seq":0,"status":"completed","finished_at":"2026-01-01T00:00:00Z"}`))
	f.Add("mlx.worker.w1.attempt", []byte(`{"job_id":"j","attempt":1,"worker_id":"w1","error":{"code":"runtime_crashed","message":"x"},"text":"","seq":0,"completion_tokens":0,"reported_at":"2026-01-01T00:00:00Z"}`))
	f.Add("mlx.cancel.a.j", []byte(`{"job_id":"j","reason":"r","requested_at":"2026-01-01T00:00:00Z"}`))
	f.Add("mlx.worker..done.d1", []byte(`{}`))
	f.Add("mlx.cancel.a.*", []byte(`null`))
	f.Add("x", []byte(`{"batch_id":"b","worker_id":"w","status":"accepted","free_slots":-1}`))
	f.Fuzz(func(t *testing.T, subject string, data []byte) {
		if len(data) > fuzzCap {
			data = data[:fuzzCap]
		}
		if r, err := decodeAssignReply(data); err == nil {
			if r.FreeSlots < 0 || (r.Status != schemas.AssignAccepted && r.Status != schemas.AssignFull && r.Status != schemas.AssignRejected) {
				t.Fatalf("accepted assignment reply %+v", r)
			}
		}
		if wid, res, ok := decodeDone(subject, data); ok {
			if !subjects.ValidID(wid) && wid == "" {
				t.Fatalf("done from %q", wid)
			}
			if _, ok := eventForStatus(res.Status); !ok && res.Status != "" {
				raw, _ := json.Marshal(res)
				if schemas.Validate(schemas.Result, raw) == nil {
					t.Fatalf("result status %q passes the schema but has no event", res.Status)
				}
			}
		}
		if wid, r, ok := decodeAttempt(subject, data); ok && (wid == "" || r.Attempt < 1) {
			t.Fatalf("attempt report %+v from %q", r, wid)
		}
		if ref, reason, ok := decodeCancel(subject, data); ok && (!subjects.ValidID(ref.ID) || reason == "") {
			t.Fatalf("cancel %+v %q", ref, reason)
		}
	})
}

// manyProps is a job body with n unknown properties: its validation error
// names each, longer than a record's error message may be.
func manyProps(n int) string {
	var b strings.Builder
	b.WriteString(`{"id":"many"`)
	for i := range n {
		fmt.Fprintf(&b, `,"p%d":1`, i)
	}
	b.WriteString("}")
	return b.String()
}
