"""Defaults a client relies on without saying so, through the official openai client."""

from __future__ import annotations

import openai
import pytest

EOS = "2"  # the tiny model's EOS token id


@pytest.fixture(scope="module")
def client(up):
    return openai.OpenAI(base_url=up.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("stream", [False, True])
def test_no_max_tokens_runs_to_the_end_of_the_context(client, up, stream):
    """Without max_tokens, generation runs until EOS, a stop or the end of the context
    (the tiny model's 2048 tokens, under the 4096 cap). EOS is banned here, so it must
    reach the context's end. Mutation caught: any fixed default (the runtime's old 256,
    OpenAI's 16 for completions) stops for length early."""
    chat = client.chat.completions.create(
        model=up.model, messages=[{"role": "user", "content": "go"}], logit_bias={EOS: -100},
        stream=stream, **({"stream_options": {"include_usage": True}} if stream else {}),
    )
    comp = client.completions.create(
        model=up.model, prompt="Once upon a time", logit_bias={EOS: -100},
        stream=stream, **({"stream_options": {"include_usage": True}} if stream else {}),
    )
    for r in (chat, comp):
        if stream:
            chunks = list(r)
            usage = chunks[-1].usage
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert finish == ["length"], finish
        else:
            usage = r.usage
            assert r.choices[0].finish_reason == "length"
        assert usage.total_tokens == 2048, usage
