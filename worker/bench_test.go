package worker

import (
	"bufio"
	"context"
	"io"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// The token path: a generate.chunk line from the runtime's stdout → RuntimeClient
// → emitter → token event published on NATS → received by the caller. The fake
// runtime is a goroutine on a pipe; NATS is an embedded server on loopback.

type pipeBench struct {
	client *RuntimeClient
	req    *bufio.Reader
	out    io.Writer
}

func newPipeBench(b *testing.B) *pipeBench {
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	c := NewRuntimeClient(outR, inW, RuntimeClientOptions{})
	b.Cleanup(func() { c.Close(); outW.Close() })
	return &pipeBench{client: c, req: bufio.NewReader(inR), out: outW}
}

var chunkLine = []byte(`{"jsonrpc":"2.0","method":"generate.chunk","params":{"request_id":"bench.1","seq":`)

// serve answers one generate with n chunks; wait, when set, runs after each chunk.
func (p *pipeBench) serve(n int, wait func()) {
	if _, err := p.req.ReadBytes('\n'); err != nil {
		return
	}
	w := bufio.NewWriter(p.out)
	line := make([]byte, 0, 256)
	for i := 0; i < n; i++ {
		line = append(line[:0], chunkLine...)
		line = strconv.AppendInt(line, int64(i), 10)
		line = append(line, `,"text":" token","tokens":`...)
		line = strconv.AppendInt(line, int64(i+1), 10)
		line = append(line, "}}\n"...)
		w.Write(line)
		if wait != nil {
			w.Flush()
			wait()
		}
	}
	w.WriteString(`{"jsonrpc":"2.0","id":1,"result":{"request_id":"bench.1","finish_reason":"length","text":"","usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2},"timings":{"ttft_ms":1,"total_ms":1,"tokens_per_s":1}}}` + "\n")
	w.Flush()
}

func benchConns(b *testing.B) (pub, sub *nats.Conn) {
	tb := startBus(b, 0)
	sub, err := nats.Connect(tb.srv.ClientURL())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(sub.Close)
	return tb.nc, sub
}

// BenchmarkTokenPathLatency: one chunk at a time, the next only after the caller
// received the previous event — ns/op is the full per-token latency.
func BenchmarkTokenPathLatency(b *testing.B) {
	pub, subc := benchConns(b)
	got := make(chan struct{}, 1)
	sub, err := subc.Subscribe("bench.reply", func(*nats.Msg) { got <- struct{}{} })
	if err != nil {
		b.Fatal(err)
	}
	defer sub.Unsubscribe()
	subc.Flush()
	p := newPipeBench(b)
	em := newEmitter(pub, "bench.reply", "bench", 1, 0, Coalesce{})
	b.ReportAllocs()
	b.ResetTimer()
	go p.serve(b.N, func() { <-got })
	if _, err := p.client.Generate(context.Background(), &schemas.GenerateParams{RequestID: "bench.1", Model: "tiny"}, GenerateHooks{Chunk: em.chunk}); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkNATSRoundTripBaseline is the same publish → receive ping-pong with a
// token event sized payload and no worker in between: subtract it from
// BenchmarkTokenPathLatency to get what the worker adds per token.
func BenchmarkNATSRoundTripBaseline(b *testing.B) {
	pub, subc := benchConns(b)
	got := make(chan struct{}, 1)
	sub, err := subc.Subscribe("bench.reply", func(*nats.Msg) { got <- struct{}{} })
	if err != nil {
		b.Fatal(err)
	}
	defer sub.Unsubscribe()
	subc.Flush()
	payload := []byte(`{"type":"token","job_id":"bench","attempt":1,"seq":12345,"delta":" token","tokens":12346}`)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := pub.Publish("bench.reply", payload); err != nil {
			b.Fatal(err)
		}
		<-got
	}
}

// BenchmarkTokenPathThroughput streams chunks as fast as the pipe takes them.
func BenchmarkTokenPathThroughput(b *testing.B) {
	pub, subc := benchConns(b)
	done := make(chan struct{})
	n := 0
	sub, err := subc.Subscribe("bench.reply", func(*nats.Msg) {
		n++
		if n == b.N {
			close(done)
		}
	})
	if err != nil {
		b.Fatal(err)
	}
	sub.SetPendingLimits(-1, -1)
	defer sub.Unsubscribe()
	subc.Flush()
	p := newPipeBench(b)
	em := newEmitter(pub, "bench.reply", "bench", 1, 0, Coalesce{})
	b.ReportAllocs()
	b.ResetTimer()
	go p.serve(b.N, nil)
	if _, err := p.client.Generate(context.Background(), &schemas.GenerateParams{RequestID: "bench.1", Model: "tiny"}, GenerateHooks{Chunk: em.chunk}); err != nil {
		b.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		b.Fatalf("received %d of %d events", n, b.N)
	}
}

// BenchmarkChunkToEvent is the worker's own share without NATS: decode the line,
// route it, encode the event.
func BenchmarkChunkToEvent(b *testing.B) {
	p := newPipeBench(b)
	em := newEmitter(nil, "", "bench", 1, 0, Coalesce{})
	b.ReportAllocs()
	b.ResetTimer()
	go p.serve(b.N, nil)
	if _, err := p.client.Generate(context.Background(), &schemas.GenerateParams{RequestID: "bench.1", Model: "tiny"}, GenerateHooks{Chunk: em.chunk}); err != nil {
		b.Fatal(err)
	}
}
