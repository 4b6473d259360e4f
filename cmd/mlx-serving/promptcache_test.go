package main

import (
	"errors"
	"flag"
	"slices"
	"testing"

	"github.com/mlx-serving/mlx-serving/config"
)

// prompt_cache_bytes reaches the runtime's command line only when set: -1 (the
// default) leaves the size to the runtime, 0 turns the cache off.
//
// Mutation caught: promptCacheArgs returning nil for every value (the setting
// never reaches the runtime: "0" gives no --prompt-cache-bytes 0).
func TestPromptCacheBytesToRuntimeArgs(t *testing.T) {
	load := func(env ...string) (config.Config, error) {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		config.RegisterFlags(fs)
		return config.Load(fs, env)
	}
	c, err := load()
	if err != nil {
		t.Fatal(err)
	}
	if c.PromptCacheBytes != -1 || promptCacheArgs(c.PromptCacheBytes) != nil {
		t.Fatalf("default %d gives %v, want -1 and no flag", c.PromptCacheBytes, promptCacheArgs(c.PromptCacheBytes))
	}
	for env, want := range map[string][]string{
		"0":         {"--prompt-cache-bytes", "0"},
		"268435456": {"--prompt-cache-bytes", "268435456"},
	} {
		c, err := load("MLX_SERVING_PROMPT_CACHE_BYTES=" + env)
		if err != nil {
			t.Fatal(err)
		}
		if got := promptCacheArgs(c.PromptCacheBytes); !slices.Equal(got, want) {
			t.Fatalf("%s: runtime args %v, want %v", env, got, want)
		}
	}
	if _, err := load("MLX_SERVING_PROMPT_CACHE_BYTES=-2"); !errors.Is(err, config.ErrInvalid) {
		t.Fatalf("-2: %v, want ErrInvalid", err)
	}
}
