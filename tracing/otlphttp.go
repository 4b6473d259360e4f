package tracing

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// otlpHTTP is the OTLP/HTTP (protobuf) client under otel's generic exporter
// (otlptrace). otel's own otlptracehttp links gRPC, its gateway and every
// collector message for config it shares with the gRPC exporter; their package
// inits alone kept ~2 MB of every mlx-serving process resident, including the
// worker, whose budget is 32 MB (issue #13). The body is the one message the
// collector takes: ExportTraceServiceRequest { repeated ResourceSpans
// resource_spans = 1; }, which is each ResourceSpans as field 1.
type otlpHTTP struct {
	url    string
	client *http.Client
	tries  int
	wait   time.Duration // before the first retry; doubles
}

var _ otlptrace.Client = (*otlpHTTP)(nil)

func newOTLPHTTP(url string) *otlpHTTP {
	return &otlpHTTP{url: url, client: &http.Client{Timeout: 10 * time.Second}, tries: 3, wait: 500 * time.Millisecond}
}

func (c *otlpHTTP) Start(context.Context) error { return nil }

func (c *otlpHTTP) Stop(context.Context) error {
	c.client.CloseIdleConnections()
	return nil
}

// exportRequest encodes an ExportTraceServiceRequest.
func exportRequest(spans []*tracepb.ResourceSpans) ([]byte, error) {
	var b []byte
	for _, rs := range spans {
		m, err := proto.Marshal(rs)
		if err != nil {
			return nil, err
		}
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendBytes(b, m)
	}
	return b, nil
}

// UploadTraces posts the spans, retrying what the OTLP spec calls retryable
// (429, 502, 503, 504, and a connection that failed) a few times within ctx.
// A collector that keeps failing loses these spans: tracing never holds up
// serving.
func (c *otlpHTTP) UploadTraces(ctx context.Context, spans []*tracepb.ResourceSpans) error {
	body, err := exportRequest(spans)
	if err != nil {
		return fmt.Errorf("tracing: encode spans: %w", err)
	}
	wait := c.wait
	for try := 1; ; try++ {
		retry, err := c.post(ctx, body)
		if err == nil || !retry || try >= c.tries {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (then %w)", err, ctx.Err())
		case <-time.After(wait):
		}
		wait *= 2
	}
}

func (c *otlpHTTP) post(ctx context.Context, body []byte) (retry bool, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, bytes.NewReader(body))
	if err != nil {
		return false, err
	}
	req.Header.Set("Content-Type", "application/x-protobuf")
	req.Header.Set("User-Agent", "mlx-serving OTLP exporter")
	resp, err := c.client.Do(req)
	if err != nil {
		return ctx.Err() == nil, fmt.Errorf("tracing: post spans to %s: %w", c.url, err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	if resp.StatusCode >= 200 && resp.StatusCode <= 299 {
		return false, nil
	}
	err = fmt.Errorf("tracing: collector %s answered %s: %s", c.url, resp.Status, strings.TrimSpace(string(msg)))
	switch resp.StatusCode {
	case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return true, err
	}
	return false, err
}
