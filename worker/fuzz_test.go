package worker

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// fuzzMaxLine is the client's line bound in the fuzz target. bufio.Scanner never
// enforces a bound below its 64 KiB initial buffer, so that is the smallest bound
// the client has.
const fuzzMaxLine = 64 << 10

// FuzzRuntimeReader sends the client's reader arbitrary bytes from the runtime's
// stdout and checks that it never panics, that a line over the bound ends the
// client with ErrRuntimeExited (as a dead runtime does) and that anything else
// leaves it working: after the noise, a request still gets its answer. The seeds
// are the protocol vectors of schemas/testdata (responses, notifications, chunks).
func FuzzRuntimeReader(f *testing.F) {
	for _, dir := range []string{"runtime.response", "runtime.notification", "runtime.generate.chunk", "runtime.request"} {
		for _, kind := range []string{"valid", "invalid"} {
			paths, err := filepath.Glob(filepath.Join("..", "schemas", "testdata", dir, kind, "*.json"))
			if err != nil || len(paths) == 0 {
				f.Fatalf("vectors %s/%s: %v", dir, kind, err)
			}
			for _, p := range paths {
				raw, err := os.ReadFile(p)
				if err != nil {
					f.Fatal(err)
				}
				f.Add(bytes.ReplaceAll(raw, []byte("\n"), nil))
			}
		}
	}
	for _, s := range []string{"", "\n\n", "{}", "null", `{"params":null,"method":"generate.chunk"}`,
		`{"jsonrpc":"2.0","id":"1","result":{}}`, `{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"x"}}`,
		`{"id":1e400}`, "\xff\xfe\r\n", string(bytes.Repeat([]byte("x"), fuzzMaxLine+1))} {
		f.Add([]byte(s))
	}

	f.Fuzz(func(t *testing.T, noise []byte) {
		outR, outW := io.Pipe() // runtime stdout → client
		inR, inW := io.Pipe()   // client → runtime stdin
		c := NewRuntimeClient(outR, inW, RuntimeClientOptions{MaxLineBytes: fuzzMaxLine, Logger: zerolog.Nop()})
		defer func() {
			c.Close()
			_ = outW.Close()
			_ = inR.Close()
		}()

		// A barrier chunk with a nonce the noise cannot hold: once it arrives,
		// every noise line has been read, before any request is pending.
		nonce := make([]byte, 16)
		_, _ = rand.Read(nonce)
		barrier := "barrier-" + hex.EncodeToString(nonce)
		got := make(chan struct{}, 1)
		bs := &chunkStream{hook: func(*schemas.GenerateChunk) {
			select {
			case got <- struct{}{}:
			default:
			}
		}}
		c.mu.Lock()
		c.streams[barrier] = bs
		c.mu.Unlock()

		written := make(chan error, 1)
		go func() {
			_, err := outW.Write(append(append([]byte(nil), noise...), '\n'))
			if err == nil {
				_, err = outW.Write([]byte(`{"jsonrpc":"2.0","method":"generate.chunk","params":{"request_id":"` + barrier + `","seq":0,"text":"","tokens":0}}` + "\n"))
			}
			written <- err
		}()
		longest := 0
		for _, line := range bytes.Split(noise, []byte("\n")) {
			longest = max(longest, len(line))
		}
		// Within a byte or two of the bound (the newline, a \r) either outcome is right.
		tooLong, fits := longest > fuzzMaxLine, longest < fuzzMaxLine-2
		timeout := time.NewTimer(10 * time.Second)
		defer timeout.Stop()
	wait:
		for {
			select {
			case <-got:
				// Only our chunk names the barrier: every noise line is read.
				if tooLong {
					t.Fatalf("the reader went on past a line of %d bytes", longest)
				}
				break wait
			case <-c.Done():
				if fits {
					t.Fatalf("the reader stopped on noise that fits its bound: %v", c.Err())
				}
				if !errors.Is(c.Err(), ErrRuntimeExited) || !errors.Is(c.Err(), bufio.ErrTooLong) {
					t.Fatalf("stopped with %v, want ErrRuntimeExited wrapping bufio.ErrTooLong", c.Err())
				}
				return
			case <-timeout.C:
				t.Fatal("the reader hung on the noise")
			}
		}

		// The client still works: a request gets its response.
		go func() {
			line, err := bufio.NewReader(inR).ReadBytes('\n')
			if err != nil {
				return
			}
			var req schemas.RPCRequest
			if json.Unmarshal(line, &req) != nil {
				return
			}
			_, _ = outW.Write([]byte(`{"jsonrpc":"2.0","id":` + strconv.FormatInt(req.ID, 10) + `,"result":{"status":"ok","active":0,"queued":0,"uptime_s":1}}` + "\n"))
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var out map[string]any
		if err := c.Call(ctx, schemas.MethodHealth, nil, &out); err != nil {
			t.Fatalf("health after the noise: %v", err)
		}
		if out["status"] != "ok" {
			t.Fatalf("health result %v", out)
		}
		<-written
	})
}
