package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

// openAIDriver streams /v1/completions (stream: true, include_usage) from an
// OpenAI-compatible server: the gateway and mlx-lm's own server alike.
type openAIDriver struct {
	base   string // http://host:port
	model  string // "" leaves the field out (mlx_lm.server then uses its --model)
	client *http.Client
}

func newOpenAIDriver(base, model string, conns int) *openAIDriver {
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:        conns * 2,
		MaxIdleConnsPerHost: conns * 2,
		IdleConnTimeout:     time.Minute,
	}
	return &openAIDriver{base: base, model: model, client: &http.Client{Transport: tr}}
}

type completionChunk struct {
	Choices []struct {
		Text         string  `json:"text"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *struct {
		CompletionTokens int `json:"completion_tokens"`
	} `json:"usage"`
	Error *struct {
		Message string `json:"message"`
	} `json:"error"`
}

func (d *openAIDriver) Do(ctx context.Context, req Request, rec *Recorder) (int, error) {
	body := map[string]any{
		"prompt": req.Prompt, "max_tokens": req.MaxTokens, "temperature": 0,
		"stream": true, "stream_options": map[string]any{"include_usage": true},
	}
	if d.model != "" {
		body["model"] = d.model
	}
	data, _ := json.Marshal(body)
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, d.base+"/v1/completions", bytes.NewReader(data))
	if err != nil {
		return 0, err
	}
	hreq.Header.Set("Content-Type", "application/json")
	resp, err := d.client.Do(hreq)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return 0, fmt.Errorf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(b)))
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	usage := 0
	for sc.Scan() {
		payload, ok := bytes.CutPrefix(sc.Bytes(), []byte("data: "))
		if !ok {
			continue
		}
		if bytes.Equal(payload, []byte("[DONE]")) {
			rec.Spread(usage)
			return usage, nil
		}
		var c completionChunk
		if err := json.Unmarshal(payload, &c); err != nil {
			return 0, fmt.Errorf("bad SSE chunk %q: %w", payload, err)
		}
		if c.Error != nil {
			return 0, errors.New(c.Error.Message)
		}
		if c.Usage != nil {
			usage = c.Usage.CompletionTokens
		}
		if len(c.Choices) > 0 && c.Choices[0].Text != "" {
			rec.Token(1)
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, errors.New("stream ended without [DONE]")
}

// waitHTTP polls url until it answers 200 or ctx ends.
func waitHTTP(ctx context.Context, url string) error {
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready: %w (last: %v)", url, ctx.Err(), err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}
