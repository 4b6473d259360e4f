package schemas

import (
	"os"
	"testing"
)

// BenchmarkValidateJob validates a typical chat job with sampling parameters.
func BenchmarkValidateJob(b *testing.B) {
	doc, err := os.ReadFile("testdata/job/valid/chat_every_field.json")
	if err != nil {
		b.Fatal(err)
	}
	benchValidate(b, Job, doc)
}

// BenchmarkValidateTokenEvent validates one token event, the most frequent message.
func BenchmarkValidateTokenEvent(b *testing.B) {
	doc := []byte(`{"type":"token","job_id":"01JZ8Q4T6W3N5V7X9Y1A2B3C4D","attempt":1,"seq":17,"delta":" upon","tokens":18}`)
	benchValidate(b, TokenEvent, doc)
}

// BenchmarkValidateInvalidJob measures the error path: a job with three violations.
func BenchmarkValidateInvalidJob(b *testing.B) {
	doc := []byte(`{"id":"01JZ8Q4T6W3N5V7X9Y1A2B3C4D","messages":[{"role":"user","content":"a"},{"role":"robot","content":"b"}],"temperature":5,"reply_to":"_INBOX.a"}`)
	if err := Validate(Job, doc); err == nil {
		b.Fatal("invalid job passed")
	}
	b.ReportAllocs()
	for b.Loop() {
		_ = Validate(Job, doc)
	}
}

func benchValidate(b *testing.B, t Type, doc []byte) {
	if err := Validate(t, doc); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.SetBytes(int64(len(doc)))
	for b.Loop() {
		if err := Validate(t, doc); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkValidateResult validates a completed job's record, which the
// dispatcher validates once per job when a worker hands it over.
func BenchmarkValidateResult(b *testing.B) {
	doc := []byte(`{"type":"result","job_id":"01JZ8Q4T6W3N5V7X9Y1A2B3C4D","attempt":1,"seq":9,"status":"completed","finish_reason":"length","text":" once upon a time there was","usage":{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20},"model":"tiny","tenant":"default","worker_id":"w1","timings":{"queued_ms":1.5,"ttft_ms":3.25,"total_ms":12.5,"tokens_per_s":640},"finished_at":"2026-12-01T11:00:00.123Z"}`)
	benchValidate(b, Result, doc)
}
