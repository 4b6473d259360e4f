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
