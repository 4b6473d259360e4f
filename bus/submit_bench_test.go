package bus_test

import (
	"context"
	"fmt"
	"strconv"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
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
