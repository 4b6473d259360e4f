package chaos

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/natsserver"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// BenchmarkSubmitSync measures what sync_interval: always costs a producer:
// synchronous Producer.Submit (RESULTS check, publish, wait for the ack) on two
// real JetStream file stores side by side, one fsyncing every write, one on
// the server's default interval (2 minutes). Submits alternate between them,
// so both see the same machine at the same moment; the ratio is the number
// to quote, the absolute figures depend on the disk.
func BenchmarkSubmitSync(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	always := benchProducer(b, true)
	interval := benchProducer(b, false)
	lat := map[bool][]time.Duration{}
	var took [2]time.Duration
	b.ResetTimer()
	for i := range b.N {
		for k, p := range []*bus.Client{always, interval} {
			job := &schemas.JobRequest{ID: fmt.Sprintf("bench%d%09d", k, i), Model: "tiny", Prompt: "benchmark prompt", MaxTokens: 16}
			t0 := time.Now()
			if _, err := p.Submit(ctx, job); err != nil {
				b.Fatal(err)
			}
			d := time.Since(t0)
			took[k] += d
			lat[k == 0] = append(lat[k == 0], d)
		}
	}
	b.StopTimer()
	p50 := func(ds []time.Duration) float64 {
		slices.Sort(ds)
		return float64(ds[len(ds)/2].Microseconds())
	}
	p99 := func(ds []time.Duration) float64 {
		return float64(ds[len(ds)*99/100].Microseconds())
	}
	b.ReportMetric(float64(took[0].Microseconds())/float64(b.N), "always-µs/submit")
	b.ReportMetric(float64(took[1].Microseconds())/float64(b.N), "interval-µs/submit")
	b.ReportMetric(p50(lat[true]), "always-p50-µs")
	b.ReportMetric(p50(lat[false]), "interval-p50-µs")
	b.ReportMetric(p99(lat[true]), "always-p99-µs")
	b.ReportMetric(p99(lat[false]), "interval-p99-µs")
	b.ReportMetric(float64(took[0])/float64(took[1]), "always/interval")
}

// benchProducer starts an embedded server on a temp file store with the given
// sync setting, provisions it and returns a producer on it.
func benchProducer(b *testing.B, syncAlways bool) *bus.Client {
	b.Helper()
	nc := testenv.StartBusWith(b, testenv.BusOptions{Server: natsserver.Options{SyncAlways: syncAlways}}).Conn
	p, err := bus.NewClient(nc)
	if err != nil {
		b.Fatal(err)
	}
	return p
}
