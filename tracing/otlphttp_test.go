package tracing

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"
)

// collector answers each POST with the next status of answers (the last one
// repeats) and keeps every body it decoded with the official OTLP messages.
type collector struct {
	mu      sync.Mutex
	answers []int
	posts   int
	got     []*collectortrace.ExportTraceServiceRequest
}

func (c *collector) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	var req collectortrace.ExportTraceServiceRequest
	if err := proto.Unmarshal(body, &req); err != nil || r.Header.Get("Content-Type") != "application/x-protobuf" {
		http.Error(w, "bad body", http.StatusBadRequest)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	code := c.answers[min(c.posts, len(c.answers)-1)]
	c.posts++
	c.got = append(c.got, &req)
	w.WriteHeader(code)
	_, _ = w.Write([]byte("nope"))
}

func spans(names ...string) []*tracepb.ResourceSpans {
	var out []*tracepb.ResourceSpans
	for _, n := range names {
		out = append(out, &tracepb.ResourceSpans{ScopeSpans: []*tracepb.ScopeSpans{{Spans: []*tracepb.Span{{Name: n, TraceId: make([]byte, 16), SpanId: make([]byte, 8)}}}}})
	}
	return out
}

func TestOTLPHTTPUpload(t *testing.T) {
	for _, tc := range []struct {
		name      string
		answers   []int
		wantPosts int
		wantErr   string
	}{
		{"accepted", []int{200}, 1, ""},
		{"retryable answers are retried", []int{503, 429, 200}, 3, ""},
		{"retries are bounded", []int{502}, 3, "502 Bad Gateway: nope"},
		{"a refusal is not retried", []int{400}, 1, "400 Bad Request: nope"},
	} {
		col := &collector{answers: tc.answers}
		srv := httptest.NewServer(col)
		c := newOTLPHTTP(srv.URL + "/v1/traces")
		c.wait = time.Millisecond
		err := c.UploadTraces(context.Background(), spans("a", "b"))
		srv.Close()
		if (err == nil) != (tc.wantErr == "") || (err != nil && !strings.Contains(err.Error(), tc.wantErr)) {
			t.Errorf("%s: err %v, want %q", tc.name, err, tc.wantErr)
		}
		if col.posts != tc.wantPosts {
			t.Errorf("%s: %d posts, want %d", tc.name, col.posts, tc.wantPosts)
		}
		// Every ResourceSpans arrives, in order, as the collector's own message reads it.
		for _, req := range col.got {
			var names []string
			for _, rs := range req.ResourceSpans {
				for _, ss := range rs.ScopeSpans {
					for _, s := range ss.Spans {
						names = append(names, s.Name)
					}
				}
			}
			if strings.Join(names, ",") != "a,b" {
				t.Errorf("%s: collector read spans %v, want [a b]", tc.name, names)
			}
		}
	}
}

// A collector that is not there fails the upload once ctx ends, not later.
func TestOTLPHTTPUnreachable(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close()
	c := newOTLPHTTP(url + "/v1/traces")
	c.wait = time.Hour // only ctx can end the wait
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := c.UploadTraces(ctx, spans("a")); err == nil {
		t.Fatal("upload to nowhere succeeded")
	}
}
