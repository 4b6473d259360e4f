package bus_test

import (
	"context"
	"fmt"
	"strconv"
	"testing"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// BenchmarkJobPublishExpectation measures what the client's publish
// expectation (no message under mlx.jobs.<tenant>.*.<id>, checked by the
// server on every job) costs on a JOBS stream already holding 10,000 queued
// jobs over the three priorities: the same publish with and without the two
// headers, in one run, so their ratio is the figure (absolute numbers are the
// machine's).
func BenchmarkJobPublishExpectation(b *testing.B) {
	for _, expect := range []bool{false, true} {
		b.Run(fmt.Sprintf("expect=%v", expect), func(b *testing.B) {
			e := testenv.StartBus(b, jsprov.Options{JobsMaxMsgs: 1 << 20})
			ctx := context.Background()
			prios := []string{"high", "normal", "low"}
			for i := range 10000 {
				if _, err := e.JS.PublishAsync(subjects.Job("t", prios[i%3], "pre-"+strconv.Itoa(i)), []byte(`{}`)); err != nil {
					b.Fatal(err)
				}
			}
			<-e.JS.PublishAsyncComplete()
			b.ResetTimer()
			for i := range b.N {
				id := "job-" + strconv.Itoa(i)
				m := &nats.Msg{Subject: subjects.Job("t", prios[i%3], id), Data: []byte(`{}`), Header: nats.Header{}}
				if expect {
					m.Header.Set(jetstream.ExpectedLastSubjSeqHeader, "0")
					m.Header.Set(jetstream.ExpectedLastSubjSeqSubjHeader, subjects.JobAnyPriority("t", id))
				}
				if _, err := e.JS.PublishMsg(ctx, m); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkSubmitID measures one Submit, call to publish ack, of a job whose
// id this process minted (no RESULTS lookup before the publish) against one
// whose id the caller chose (looked up first), alternating in one run on one
// server with the file store's interval fsync; their ratio is the figure.
func BenchmarkSubmitID(b *testing.B) {
	e := testenv.StartBus(b, jsprov.Options{JobsMaxMsgs: 1 << 20})
	p, err := bus.NewClient(e.Conn, bus.WithTenant("t"), bus.WithoutModelCheck())
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	chosen := 0 // every chosen id is new: a repeated run must not resubmit one
	for _, minted := range []bool{true, false} {
		b.Run(fmt.Sprintf("minted=%v", minted), func(b *testing.B) {
			for range b.N {
				job := &schemas.JobRequest{Model: "m", Prompt: "p", MaxTokens: 1}
				if !minted {
					chosen++
					job.ID = "chosen-" + strconv.Itoa(chosen)
				}
				if _, err := p.Submit(ctx, job); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
