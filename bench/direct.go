package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"time"
)

// runDirect runs every concurrency level of the direct path in one Python
// process (python/bench/direct_load.py), which times itself on its own clock;
// the samples come back relative to a base time so the Go statistics apply.
func runDirect(ctx context.Context, python, script, modelDir string, maxBatch int, levels [][]Request, concurrency []int) ([][]Sample, []time.Duration, error) {
	type reqJSON struct {
		Prompt    string `json:"prompt"`
		MaxTokens int    `json:"max_tokens"`
	}
	type levelIn struct {
		Concurrency int       `json:"concurrency"`
		Requests    []reqJSON `json:"requests"`
	}
	var in struct {
		Levels []levelIn `json:"levels"`
	}
	for i, reqs := range levels {
		lv := levelIn{Concurrency: concurrency[i]}
		for _, r := range reqs {
			lv.Requests = append(lv.Requests, reqJSON{Prompt: r.Prompt, MaxTokens: r.MaxTokens})
		}
		in.Levels = append(in.Levels, lv)
	}
	data, _ := json.Marshal(in)
	cmd := exec.CommandContext(ctx, python, script, "--model", modelDir, "--max-batch", strconv.Itoa(maxBatch))
	cmd.Env = append(os.Environ(), "HF_HUB_OFFLINE=1")
	cmd.Stdin = bytes.NewReader(data)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		return nil, nil, fmt.Errorf("direct: %s: %w", script, err)
	}
	var res struct {
		Levels []struct {
			Wall    float64 `json:"wall"`
			Samples []struct {
				Start  float64      `json:"start"`
				Events [][2]float64 `json:"events"` // [time, tokens since the previous event]
				End    float64      `json:"end"`
				Tokens int          `json:"tokens"`
			} `json:"samples"`
		} `json:"levels"`
	}
	if err := json.Unmarshal(out.Bytes(), &res); err != nil {
		return nil, nil, fmt.Errorf("direct: decode output: %w", err)
	}
	if len(res.Levels) != len(levels) {
		return nil, nil, fmt.Errorf("direct: %d levels back, %d sent", len(res.Levels), len(levels))
	}
	base := time.Now()
	at := func(s float64) time.Time { return base.Add(time.Duration(s * float64(time.Second))) }
	samples := make([][]Sample, len(levels))
	walls := make([]time.Duration, len(levels))
	for i, lv := range res.Levels {
		walls[i] = time.Duration(lv.Wall * float64(time.Second))
		for _, s := range lv.Samples {
			smp := Sample{Start: at(s.Start), End: at(s.End), Tokens: s.Tokens}
			for _, e := range s.Events {
				smp.Events = append(smp.Events, Event{At: at(e[0]), Tokens: max(int(e[1]), 1)})
			}
			samples[i] = append(samples[i], smp)
		}
	}
	return samples, walls, nil
}
