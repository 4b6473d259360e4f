package gateway

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/fakeworker"
	"github.com/mlx-serving/mlx-serving/internal/jsprov"
)

// smallSendBuffers gives each accepted connection a small send buffer, so a
// client that does not read blocks the server's writes after kilobytes, not
// after the megabytes loopback buffers grow to.
type smallSendBuffers struct{ net.Listener }

func (l smallSendBuffers) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetWriteBuffer(4096)
	}
	return c, err
}

// A client that sends its request and then reads nothing is dropped once a
// write to it has waited WriteTimeout: the handler returns (in flight back to
// zero, long before the request timeout) and its job stream is closed (the
// gateway's connection is back to the subscriptions it had), and the stall is
// counted. Streamed, its job is cancelled as for a client that left. Red team
// round 12, F1: such handlers stayed blocked in Write for as long as the
// client held the socket, each with its job stream and up to 64 MiB queued.
// Mutations caught: sseWriter.raw without SetWriteDeadline (stream) and
// answer without it (whole): the handler stays blocked and the poll times out.
func TestClientThatStopsReadingIsDropped(t *testing.T) {
	t.Parallel()
	// Enough output to fill the socket buffers many times over: ~5 MB of
	// events streamed, a ~300 KB body whole.
	tokens := make([]string, 20000)
	for i := range tokens {
		tokens[i] = fmt.Sprintf("token-%09d ", i)
	}
	for _, stream := range []bool{true, false} {
		t.Run(fmt.Sprintf("stream %v", stream), func(t *testing.T) {
			t.Parallel()
			tb := startBus(t, jsprov.Options{})
			// Streamed, the job holds on after its tokens: the stall happens while
			// it runs. Released at the end so the worker finishes it.
			fw := startFakeWorker(t, tb, fakeworker.Plan{Tokens: tokens, Block: stream})
			t.Cleanup(fw.Release)
			nc := tb.connect(t)
			cfg := testConfig(t, nc)
			cfg.WriteTimeout = 200 * time.Millisecond
			g, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			srv := httptest.NewUnstartedServer(g.Handler())
			srv.Listener = smallSendBuffers{srv.Listener}
			srv.Start()
			t.Cleanup(srv.Close)

			body, _ := json.Marshal(chatBody(stream, nil))
			conn, err := net.Dial("tcp", srv.Listener.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = conn.Close() }) // before srv.Close: it waits for active requests
			if tc, ok := conn.(*net.TCPConn); ok {
				_ = tc.SetReadBuffer(4096)
			}
			req := fmt.Sprintf("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
			if _, err := conn.Write([]byte(req)); err != nil {
				t.Fatal(err)
			}
			// The client reads nothing from here on.
			replyTo := fw.nextJob(t).ReplyTo
			acct := tb.Server.NATSServer().GlobalAccount()

			m := observed(g)
			for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				inFlight, stalls, listening := value(m.InFlight), value(m.Stalls), acct.SubscriptionInterest(replyTo)
				if inFlight == 0 && stalls == 1 && !listening {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("in flight %v, stalls %v, job stream open %v: the handler was not dropped "+
						"(the request timeout is %s, far off)", inFlight, stalls, listening, cfg.RequestTimeout)
				}
			}
			// Streamed, the job was still running: cancelled as for a client that
			// left. Whole, it had ended before its answer was written.
			want := 0.0
			if stream {
				want = 1
			}
			if d := value(m.Disconnects); d != want {
				t.Fatalf("%v jobs cancelled for their client, want %v", d, want)
			}
		})
	}
}
