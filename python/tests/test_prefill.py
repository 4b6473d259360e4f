"""Prefill modes (prefill.py): bucketed prefill must change shapes only, never results.

Each check compares the bucketed path against mlx-lm's plain one on the tiny model,
by logprobs (the tiny model's greedy text loops on one token, so equal text alone
would not show a leak of padding into attention) and by sampled text.
"""

from __future__ import annotations

import copy
import json
import os

import jsonschema
import mlx.core as mx
import pytest
from conftest import rid, start_runtime
from mlx_lm import load

from mlx_serving_runtime import prefill

LONG = "Along the quiet valley road: " + " ".join(f"v{i} hill cloud" for i in range(50))


# ---- the bucket function ----


def test_buckets_are_few_and_pad_little() -> None:
    seen = set()
    for n in range(1, 9000):
        b = prefill.bucket(n)
        assert b >= n
        assert prefill.bucket(b) == b  # a bucket is its own bucket
        if n > prefill.MIN_BUCKET:
            assert b - n <= n // prefill.PER_OCTAVE, (n, b)  # at most 25% padding
        seen.add(b)
    for k in range(8, 13):  # each doubling above the minimum holds PER_OCTAVE buckets
        assert len([b for b in seen if 2**k < b <= 2 ** (k + 1)]) == prefill.PER_OCTAVE
    assert min(seen) == prefill.MIN_BUCKET
    assert prefill.align_history(1) == prefill.align_history(256) == 256


def test_resolve_and_apply(monkeypatch) -> None:
    """auto is plain off CUDA; the env names the mode when the flag does not; unfused turns cuDNN off."""
    monkeypatch.delenv(prefill.ENV, raising=False)
    monkeypatch.delenv(prefill.CUDNN_ENV, raising=False)
    assert prefill.resolve(None) == ("unfused" if prefill.on_cuda() else "plain")
    monkeypatch.setenv(prefill.ENV, "buckets")
    assert prefill.resolve(None) == "buckets"
    assert prefill.resolve("plain") == "plain"  # the flag wins over the env
    with pytest.raises(ValueError):
        prefill.resolve("padded")
    prefill.apply("buckets")
    assert prefill.CUDNN_ENV not in os.environ
    monkeypatch.setenv(prefill.CUDNN_ENV, "1")  # restored (unset) after the test
    prefill.apply("unfused")
    assert os.environ[prefill.CUDNN_ENV] == "0"


def test_runtime_rejects_an_unknown_mode() -> None:
    rt = start_runtime("--prefill-mode", "padded")
    assert rt.proc.wait(timeout=60) == 2


# ---- the generator, in process ----


@pytest.fixture(scope="module")
def lm(tiny_model: str):
    return load(tiny_model)


def _run(lm, mode, prompts, caches=None, history=None, step=2048, max_tokens=5):
    """Tokens, per-step logprobs and the finished (cache, tokens) of each prompt."""
    model, tok = lm
    g = prefill.new_generator(
        model,
        mode,
        stop_tokens=[[t] for t in tok.eos_token_ids],
        prefill_step_size=step,
        completion_batch_size=8,
        prefill_batch_size=8,
    )
    uids = g.insert(prompts, max_tokens=[max_tokens] * len(prompts), caches=caches, all_tokens=history)
    toks = {u: [] for u in uids}
    lps = {u: [] for u in uids}
    done = {}
    while len(done) < len(uids):
        for r in g.next()[1]:
            toks[r.uid].append(r.token)
            lps[r.uid].append(r.logprobs)
            if r.finish_reason is not None:
                done[r.uid] = (r.prompt_cache, r.all_tokens)
    return [toks[u] for u in uids], [mx.stack(lps[u]) for u in uids], [done[u] for u in uids]


def _same(a, b) -> None:
    ta, la, _ = a
    tb, lb, _ = b
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert mx.allclose(x, y, atol=1e-4).item(), float(mx.abs(x - y).max())


PROMPTS = [[(37 * i + 11 * j) % 400 + 3 for i in range(n)] for j, n in enumerate([5, 17, 40, 300, 2, 129])]


def test_bucketed_batch_matches_plain(lm) -> None:
    """Rows of many lengths in one batch, each padded further by the bucket.

    Mutation caught: prefill.py BucketedPromptBatch.prompt without c.finalize() (the
    padding stays between a row's prompt and its first token: logprobs differ by ~0.5).
    Mutation caught: prefill.py bucket returning n (no padding): the cache below holds
    299 positions, not 320.
    """
    plain = _run(lm, "plain", PROMPTS)
    buckets = _run(lm, "buckets", PROMPTS)
    _same(plain, buckets)
    # The padding happened: the longest row's cache held more positions than its prompt.
    model, tok = lm
    g = prefill.new_generator(model, "buckets", stop_tokens=[[t] for t in tok.eos_token_ids])
    assert isinstance(g._prompt_batch, prefill.BucketedPromptBatch)
    g.insert([PROMPTS[3]], max_tokens=[2])
    g.next()
    assert len(PROMPTS[3]) - 1 == 299  # the last token is decoded, not prefilled
    assert g._prompt_batch.prompt_cache[0]._idx == 320


def test_bucketed_chunks_match_plain(lm) -> None:
    """A prompt longer than the prefill step: chunks, each padded, on aligned history."""
    long = [PROMPTS[3] + PROMPTS[5]]
    _same(_run(lm, "plain", long, step=64), _run(lm, "buckets", long, step=64))


@pytest.mark.parametrize("row", [2, 3])
def test_cached_history_matches_plain(lm, row) -> None:
    """A reused cache (history not a multiple of 256) left-padded to one, then extended.

    Mutation caught: prefill.py _pad_history not adding to left_padding (the padding
    is attended to: logprobs differ).
    """
    first = _run(lm, "plain", PROMPTS)
    cache, hist = first[2][row]
    assert len(hist) % prefill.HISTORY_QUANTUM
    more = [11, 12, 13, 14, 15, 16, 17]
    args = dict(history=[list(hist)])
    plain = _run(lm, "plain", [more], caches=[copy.deepcopy(cache)], **args)
    buckets = _run(lm, "buckets", [more], caches=[copy.deepcopy(cache)], **args)
    _same(plain, buckets)
    _same(plain, _run(lm, "buckets", [list(hist) + more]))  # and as one prompt, no cache


# ---- the runtime: buckets + cache against plain without a cache ----


@pytest.fixture(scope="module")
def pair(tiny_model: str):
    on = start_runtime("--max-batch", "8", "--prefill-mode", "buckets")
    off = start_runtime("--max-batch", "8", "--prefill-mode", "plain", "--prompt-cache-bytes", "0")
    for r in (on, off):
        assert r.result("model.load", {"model": tiny_model, "id": "tiny"})["id"] == "tiny"
    yield on, off
    for r in (on, off):
        assert r.close() == 0
        assert not r.violations, r.violations


def both(pair, **params):
    out = []
    for rt in pair:
        r = rt.call("generate", {"model": "tiny", "request_id": rid("pf"), **params})
        assert "result" in r, r
        out.append(r["result"])
    return out


def _same_logprobs(a, b) -> None:
    la, lb = a["logprobs"], b["logprobs"]
    assert [e["token"] for e in la] == [e["token"] for e in lb]
    for x, y in zip(la, lb, strict=True):
        assert abs(x["logprob"] - y["logprob"]) < 1e-3, (x, y)


def test_runtime_same_text_and_logprobs_cached_or_not(pair) -> None:
    """Sampled text and logprobs match; asked again (a cache hit), they still match."""
    params = dict(prompt="Bucket: " + LONG, max_tokens=16, temperature=1.0, seed=3, logprobs=2)
    for ask in range(2):
        a, b = both(pair, **params)
        assert a["text"] == b["text"], (ask, a["text"], b["text"])
        _same_logprobs(a, b)
        assert (a["usage"]["cached_tokens"] > 0) == (ask == 1)
    assert len(set(a["text"])) > 3, a["text"]  # sampled text varies: a real comparison


def test_runtime_chat_continuation_and_structured(pair) -> None:
    """A growing chat, a migrated job's continuation and a json_schema answer: all unchanged."""
    messages = [{"role": "system", "content": "Chat. " + LONG}, {"role": "user", "content": "Stones?"}]
    for turn in range(3):
        a, b = both(pair, messages=messages, max_tokens=12, temperature=1.0, seed=50 + turn)
        assert a["text"] == b["text"], (turn, a["text"], b["text"])
        messages += [
            {"role": "assistant", "content": a["text"]},
            {"role": "user", "content": f"Then {turn}?"},
        ]
    whole, _ = both(pair, prompt="Go on: " + LONG, max_tokens=24, temperature=1.0, seed=8)
    cont = whole["text"][: len(whole["text"]) // 2]
    a, b = both(pair, prompt="Go on: " + LONG, continuation=cont, max_tokens=10, temperature=1.0, seed=9)
    assert a["text"] == b["text"]
    assert a["usage"]["cached_tokens"] > 0
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    a, b = both(pair, prompt="JSON: " + LONG, max_tokens=120, temperature=1.0, seed=1, json_schema=schema)
    assert a["finish_reason"] == "stop", a
    jsonschema.validate(json.loads(a["text"]), schema)
    assert a["text"] == b["text"]


def test_runtime_batched_rows(pair) -> None:
    """Rows of different lengths, some cached, decoded in one batch: no text changes."""
    on, off = pair
    heads = ("Oscar", "Papa", "Quebec", "Romeo")
    for h in heads[:2]:
        both(pair, prompt=f"{h}: {LONG}", max_tokens=3)
    ids = {}
    for rt in pair:
        for i, h in enumerate(heads):
            prompt = f"{h}: {LONG}" if i % 2 == 0 else f"{h}: short"
            params = {"request_id": rid("pb"), "model": "tiny", "prompt": prompt, "max_tokens": 16}
            ids[(rt is on, h)] = rt.request("generate", {**params, "temperature": 1.0, "seed": 80 + i})
    res = {k: (on if k[0] else off).wait(v)["result"] for k, v in ids.items()}
    for h in heads:
        assert res[(True, h)]["text"] == res[(False, h)]["text"], h
