package natsserver_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/natsserver"
)

// BenchmarkGroupCommit answers one question before anyone builds it: would
// writing terminal records as JetStream atomic batches (nats-server ≥ 2.12,
// allow_atomic) make RESULTS cheaper per record than one publish each? With
// sync_always a single publish costs an fsync; a committed batch is stored with
// one coalesced fsync (stream.go, coalesceSync). But on a single-replica file
// store the server first stages every batch in a file store of its own, created
// for that batch and fsynced at the commit (jetstream_batching.go,
// newBatchStore), so a batch pays a directory, files and two fsyncs.
//
// Eight writers (the dispatcher writes records concurrently) store 300-byte
// records under the headers Finish uses (a message id, expected last subject
// sequence 0), batch=1 as plain publishes awaited one by one, batch>1 as atomic
// batches: members published, the commit a request. Reported: records/s.
//
//	go test -run '^$' -bench GroupCommit -benchtime 4096x ./internal/natsserver
func BenchmarkGroupCommit(b *testing.B) {
	for _, always := range []bool{true, false} {
		for _, size := range []int{1, 4, 16, 32} {
			b.Run(fmt.Sprintf("sync_always=%v/batch=%d", always, size), func(b *testing.B) {
				benchGroupCommit(b, always, size)
			})
		}
	}
}

func benchGroupCommit(b *testing.B, always bool, size int) {
	ctx := context.Background()
	srv, err := natsserver.Start(ctx, natsserver.Options{StoreDir: b.TempDir(), Port: -1, SyncAlways: always})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = srv.Shutdown(ctx) })
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(nc.Close)
	js, _ := jetstream.New(nc)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name: "R", Subjects: []string{"r.>"}, Storage: jetstream.FileStorage,
		MaxMsgsPerSubject: 1, Duplicates: 2 * time.Minute, AllowAtomicPublish: true,
	}); err != nil {
		b.Fatal(err)
	}
	const writers = 8
	data := make([]byte, 300)
	per := (b.N + writers - 1) / writers
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := 0; i < per; i += size {
				n := min(size, per-i)
				if err := writeRecords(ctx, nc, js, w, i, n, data); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.ReportMetric(float64(writers*per)/time.Since(start).Seconds(), "records/s")
}

// writeRecords stores n records, one publish each when n is 1, else as one
// atomic batch.
func writeRecords(ctx context.Context, nc *nats.Conn, js jetstream.JetStream, w, first, n int, data []byte) error {
	if n == 1 {
		subj := fmt.Sprintf("r.%d.%d", w, first)
		_, err := js.Publish(ctx, subj, data, jetstream.WithMsgID(subj), jetstream.WithExpectLastSequencePerSubject(0))
		return err
	}
	id := fmt.Sprintf("b%d.%d", w, first)
	for k := range n {
		subj := fmt.Sprintf("r.%d.%d", w, first+k)
		m := nats.NewMsg(subj)
		m.Data = data
		m.Header.Set(jetstream.MsgIDHeader, subj)
		m.Header.Set(jetstream.ExpectedLastSubjSeqHeader, "0")
		m.Header.Set("Nats-Batch-Id", id)
		m.Header.Set("Nats-Batch-Sequence", strconv.Itoa(k+1))
		if k < n-1 {
			if err := nc.PublishMsg(m); err != nil {
				return err
			}
			continue
		}
		m.Header.Set("Nats-Batch-Commit", "1")
		resp, err := nc.RequestMsgWithContext(ctx, m)
		if err != nil {
			return err
		}
		var ack struct {
			Error     *jetstream.APIError `json:"error"`
			BatchSize int                 `json:"count"`
		}
		if err := json.Unmarshal(resp.Data, &ack); err != nil {
			return err
		}
		if ack.Error != nil {
			return ack.Error
		}
		if ack.BatchSize != n {
			return fmt.Errorf("batch of %d acked as %d: %s", n, ack.BatchSize, resp.Data)
		}
	}
	return nil
}
