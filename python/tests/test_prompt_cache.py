"""Prompt-prefix caching: a request reuses the KV cache of its longest cached prefix.

Each behaviour is checked against a runtime with the cache off (--prompt-cache-bytes 0)
running the same requests: the cache may only change how fast the first token comes,
never the text.
"""

from __future__ import annotations

import json
import time

import jsonschema
import mlx.core as mx
import pytest
from conftest import rid, start_runtime
from mlx_lm.models.cache import KVCache

from mlx_serving_runtime.prompt_cache import PromptCache, default_max_bytes

LONG = "The history of the valley, told slowly: " + " ".join(f"w{i} stone river" for i in range(60))
HEADS = {0: "Greedy", 2: "Sampled", 3: "Penalised"}
SYSTEM = "You are a careful assistant. " + " ".join(f"rule {i}: be exact." for i in range(20))


@pytest.fixture(scope="module")
def pair(tiny_model: str):
    """(cache on, cache off): two runtimes with the tiny model as "tiny"."""
    on = start_runtime("--max-batch", "8")
    off = start_runtime("--max-batch", "8", "--prompt-cache-bytes", "0")
    for r in (on, off):
        assert r.result("model.load", {"model": tiny_model, "id": "tiny"})["id"] == "tiny"
    yield on, off
    for r in (on, off):
        assert r.close() == 0
        assert not r.violations, r.violations


def gen(rt, **params):
    params.setdefault("model", "tiny")
    params.setdefault("request_id", rid("pc"))
    r = rt.call("generate", params)
    assert "result" in r, r
    return r["result"]


def both(pair, **params):
    on, off = pair
    return gen(on, **params), gen(off, **params)


def stats(rt) -> dict:
    return rt.result("health")["prompt_cache"]


@pytest.mark.parametrize(
    "sampling",
    [{}, {"temperature": 1.0, "seed": 5}, {"temperature": 1.0, "seed": 9, "repetition_penalty": 1.5}],
    ids=["greedy", "seeded", "repetition_penalty"],
)
def test_same_prompt_twice_same_text(pair, sampling) -> None:
    """The second ask reuses all but one prompt token and yields the same text.

    The repetition penalty reads the last 20 tokens of the row's context, prompt
    included, so it shows whether the batch knows what the reused cache holds.

    Mutation caught: engine.py _start passing all_tokens=None with the reused cache
    (run alone, [repetition_penalty]: the penalty sees one prompt token, the text
    differs; in sequence the entry stored on finish is keyed by the wrong tokens and
    the next ask reuses 1 token, not n-1).
    Mutation caught: prompt_cache.py PromptCache.fetch not looking (n, key = 0, None):
    cached_tokens 0 on the second ask.
    Mutation caught: prompt_cache.py PromptCache._best with limit = len(tokens) (no
    token left to compute: "Sequence has an empty prompt" from mlx-lm).
    """
    # Its own first letter: no other test's prompt shares more than the BOS.
    prompt = f"{HEADS[len(sampling)]}: {LONG}"
    params = dict(prompt=prompt, max_tokens=24, **sampling)
    first_on, first_off = both(pair, **params)
    second_on, second_off = both(pair, **params)
    assert first_on["usage"]["cached_tokens"] < 3  # at most a BOS shared with other prompts
    n = first_on["usage"]["prompt_tokens"]
    assert n > 300
    assert second_on["usage"]["cached_tokens"] == n - 1  # one token is always computed
    assert second_off["usage"]["cached_tokens"] == 0 and first_off["usage"]["cached_tokens"] == 0
    assert first_off["text"] == second_off["text"]  # the baseline is deterministic
    assert first_on["text"] == first_off["text"]
    assert second_on["text"] == first_off["text"], (second_on["text"], first_off["text"])
    if sampling:  # greedy text of random weights loops; sampled text must vary
        assert len(set(first_off["text"])) > 3, first_off["text"]


def test_chat_growing_by_a_turn(pair) -> None:
    """A chat's next turn reuses the previous turn's prompt and reply; the text is unchanged.

    Mutation caught: prompt_cache.py PromptCache._best ignoring r.longer (the stored
    entry of turn 1 covers prompt + reply, which no prefix of turn 2 equals exactly:
    cached_tokens 0).
    Mutation caught: prompt_cache.py _copy_prefix not cutting the copy to the common
    prefix (keys, values and offset of the whole entry: the reply of turn 1 stays in
    the cache, the text of turn 2 differs).
    """
    on, off = pair
    messages = [
        {"role": "system", "content": "Chat. " + SYSTEM},
        {"role": "user", "content": "Tell me about stones."},
    ]
    prev_prompt = 0
    for turn in range(3):
        a, b = both(pair, messages=messages, max_tokens=16, temperature=1.0, seed=40 + turn)
        assert a["text"] == b["text"], (turn, a["text"], b["text"])
        assert b["usage"]["cached_tokens"] == 0
        if turn == 0:
            assert a["usage"]["cached_tokens"] < 5  # the template's opening, shared with other chats
        else:
            # Everything up to the previous turn's prompt at least came from the cache.
            assert a["usage"]["cached_tokens"] >= prev_prompt - 2, (a["usage"], prev_prompt)
            assert a["usage"]["cached_tokens"] < a["usage"]["prompt_tokens"]
        prev_prompt = a["usage"]["prompt_tokens"]
        messages = messages + [
            {"role": "assistant", "content": a["text"]},
            {"role": "user", "content": f"And then {turn}?"},
        ]


def test_continuation_with_cache_same_text(pair) -> None:
    """A migrated job (continuation = text so far) resumes identically on a cached prefix.

    Mutation caught: engine.py _end reporting the reused tokens unclipped (716 cached
    of 680 prompt tokens: the continuation is fed as prompt but is not prompt).
    """
    on, off = pair
    prompt = "Continue: " + LONG
    whole = gen(off, prompt=prompt, max_tokens=30, temperature=1.0, seed=21)
    gen(on, prompt=prompt, max_tokens=30, temperature=1.0, seed=21)  # fills the cache
    cont = whole["text"][: len(whole["text"]) // 2]
    assert cont
    params = dict(prompt=prompt, continuation=cont, max_tokens=12, temperature=1.0, seed=22)
    a, b = both(pair, **params)
    assert a["text"] == b["text"], (a["text"], b["text"])
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]
    assert 0 < a["usage"]["cached_tokens"] <= a["usage"]["prompt_tokens"]
    # Asked again, the whole continuation came from the cache too: still only prompt counts.
    again = gen(on, **params)
    assert again["text"] == b["text"]
    assert again["usage"]["cached_tokens"] == again["usage"]["prompt_tokens"]


def test_structured_output_on_cached_prefix(pair) -> None:
    """A json_schema request whose prompt is cached still follows the schema, same text.

    Mutation caught: engine.py _start dropping the row's processors when a cache is
    reused (logits_processors=None on a hit: finish "length", no JSON).
    """
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    prompt = "JSON please: " + LONG
    gen(pair[0], prompt=prompt, max_tokens=8)  # the prefix, cached without a grammar
    for seed in range(3):
        a, b = both(pair, prompt=prompt, max_tokens=120, temperature=1.0, seed=seed, json_schema=schema)
        assert a["usage"]["cached_tokens"] >= a["usage"]["prompt_tokens"] - 1
        assert a["finish_reason"] == "stop", a
        jsonschema.validate(json.loads(a["text"]), schema)
        assert a["text"] == b["text"]


def test_cached_and_fresh_rows_batched_together(pair) -> None:
    """Rows that reuse a cache and rows that do not share one batch; no text changes.

    A reused cache is merged into the running batch beside rows prefilled from
    nothing (left padding of different lengths), so this is the case where a wrong
    offset would show.
    """
    on, off = pair
    heads = ("Kilo", "Lima", "Mike", "November")
    for h in heads[:2]:  # cached on `on` before the batch
        gen(on, prompt=f"{h}: {LONG}", max_tokens=4)
    ids = {}
    for rt in pair:
        for i, h in enumerate(heads):
            params = {
                "request_id": rid("mix"),
                "model": "tiny",
                "prompt": f"{h}: {LONG}" if i % 2 == 0 else f"{h}: short",
                "max_tokens": 20,
                "temperature": 1.0,
                "seed": 70 + i,
            }
            ids[(rt is on, h)] = rt.request("generate", params)
    res = {k: (on if k[0] else off).wait(v)["result"] for k, v in ids.items()}
    for h in heads:
        a, b = res[(True, h)], res[(False, h)]
        assert a["text"] == b["text"], (h, a["text"], b["text"])
    assert res[(True, "Kilo")]["usage"]["cached_tokens"] == res[(True, "Kilo")]["usage"]["prompt_tokens"] - 1
    assert res[(True, "Mike")]["usage"]["cached_tokens"] < 3


def test_stats_in_health_and_info(pair) -> None:
    on, off = pair
    s = stats(on)
    assert s["entries"] > 0 and 0 < s["bytes"] <= s["max_bytes"]
    assert s["hits"] > 0 and s["lookups"] >= s["hits"]
    assert 0 < s["hit_tokens"] <= s["prompt_tokens"]
    assert on.result("runtime.info")["prompt_cache"]["max_bytes"] == s["max_bytes"]
    o = stats(off)
    assert o == {k: 0 for k in o}


def test_eviction_under_a_byte_cap(new_runtime, tiny_model) -> None:
    """Entries and bytes never exceed the cap; the least recently used entry goes first.

    Mutation caught: prompt_cache.py PromptCache.store without its eviction loop
    (3 entries, 1,056,256 bytes over a cap of 879,360 after the third prompt).
    """
    probe = new_runtime()
    probe.result("model.load", {"model": tiny_model, "id": "tiny"})
    prompts = [f"{h}: {LONG}" for h in ("Alpha", "Bravo", "Delta", "Echo", "Foxtrot")]
    gen(probe, prompt=prompts[0], max_tokens=8)
    one = stats(probe)["bytes"]
    assert one > 0
    cap = int(one * 2.5)  # room for two entries of this size
    rt = new_runtime("--prompt-cache-bytes", str(cap))
    rt.result("model.load", {"model": tiny_model, "id": "tiny"})
    seen = []
    for p in prompts:
        gen(rt, prompt=p, max_tokens=8)
        s = stats(rt)
        seen.append(s["entries"])
        assert s["max_bytes"] == cap
        assert s["bytes"] <= cap, s
    assert max(seen) == 2 and seen[-1] == 2, seen
    # The last two prompts are held, the first ones were evicted.
    assert gen(rt, prompt=prompts[-1], max_tokens=8)["usage"]["cached_tokens"] > 0
    first = gen(rt, prompt=prompts[0], max_tokens=8)["usage"]
    # Only the BOS, shared by every prompt, can come from the cache now.
    assert first["cached_tokens"] < 3, first
    # An entry bigger than the whole cap is not kept.
    tiny_cap = new_runtime("--prompt-cache-bytes", str(one // 2))
    tiny_cap.result("model.load", {"model": tiny_model, "id": "tiny"})
    gen(tiny_cap, prompt=prompts[0], max_tokens=8)
    assert stats(tiny_cap)["entries"] == 0 and stats(tiny_cap)["bytes"] == 0


def test_cancelled_request_is_not_cached(new_runtime, tiny_model) -> None:
    """A cancelled row leaves no entry: its cache would cover text nobody accepted.

    Mutation caught: engine.py _end keeping the cache of a cancelled row
    (remove(..., return_prompt_caches=True) stored: 1 entry, not 0).
    """
    rt = new_runtime()
    rt.result("model.load", {"model": tiny_model, "id": "tiny"})
    r = rid("pc-cancel")
    rpc = rt.request(
        "generate",
        {"request_id": r, "model": "tiny", "prompt": LONG, "max_tokens": 2000, "temperature": 1.0, "seed": 3},
    )
    deadline = time.monotonic() + 30
    while len(rt.chunks.get(r, [])) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert rt.result("cancel", {"request_id": r})["cancelled"] is True
    assert rt.wait(rpc)["result"]["finish_reason"] == "cancelled"
    assert stats(rt)["entries"] == 0


# ---- the LRU itself, on hand-made caches ----


def _cache(n: int, layers: int = 2) -> list[KVCache]:
    out = []
    for _ in range(layers):
        c = KVCache()
        c.keys = mx.arange(n, dtype=mx.float32).reshape(1, 1, n, 1)
        c.values = mx.arange(n, dtype=mx.float32).reshape(1, 1, n, 1) * 2
        c.offset = n
        out.append(c)
    return out


def test_fetch_longest_prefix_and_trim() -> None:
    pc = PromptCache(1 << 20)
    pc.store("m", [1, 2, 3, 4, 5, 6], _cache(6))
    cache, n = pc.fetch("m", [1, 2, 3, 9])  # shares 3 tokens with a longer entry
    assert n == 3 and cache[0].offset == 3 and cache[0].keys[..., :3, :].flatten().tolist() == [0, 1, 2]
    cache, n = pc.fetch("m", [1, 2, 3, 4, 5, 6])  # exact: one token is left to compute
    assert n == 5 and cache[0].offset == 5
    cache, n = pc.fetch("m", [1, 2, 3, 4, 5, 6, 7, 8])  # entry is a prefix
    assert n == 6
    assert pc.fetch("other", [1, 2, 3]) == (None, 0)
    assert pc.fetch("m", [7, 8]) == (None, 0)
    # The stored entry was not changed by the copies handed out.
    assert pc.fetch("m", [1, 2, 3, 4, 5, 6, 7])[0][0].offset == 6
    assert pc.stats()["hits"] == 4 and pc.stats()["lookups"] == 6


def test_prefix_entries_are_folded_and_lru_evicts() -> None:
    b = _cache(4)[0].nbytes * 2  # bytes of one 4-token entry (two layers)
    pc = PromptCache(b * 2)
    pc.store("m", [1, 2], _cache(2))
    pc.store("m", [1, 2, 3, 4], _cache(4))  # covers [1, 2]: that entry goes
    assert len(pc) == 1 and pc.bytes == b
    pc.store("m", [5, 6, 7, 8], _cache(4))
    pc.fetch("m", [1, 2, 3, 4, 9])  # [1..4] is now the most recently used
    pc.store("m", [9, 9, 9, 9], _cache(4))  # over the cap: the LRU entry [5..8] goes
    assert len(pc) == 2 and pc.bytes <= pc.max_bytes
    assert pc.fetch("m", [5, 6, 7, 8, 1]) == (None, 0)
    assert pc.fetch("m", [1, 2, 3, 4, 1])[1] == 4
    pc.drop_model("m")
    assert len(pc) == 0 and pc.bytes == 0


def test_memory_pressure_drops_entries() -> None:
    """Above 90% of the memory limit, least recently used entries are dropped."""
    active = [0]
    pc = PromptCache(1 << 20, memory_limit=1000, active_memory=lambda: active[0])
    for i in range(4):
        pc.store("m", [i, i, i], _cache(3))
    assert pc.relieve() == 0 and len(pc) == 4
    active[0] = 950
    dropped = []

    def falling() -> int:
        dropped.append(1)
        return 950 if len(pc) > 2 else 100

    pc._active = falling
    assert pc.relieve() == 2 and len(pc) == 2
    assert pc.fetch("m", [3, 3, 3, 1])[1] == 3  # the newest survive
    assert pc.clear() == 2 and pc.bytes == 0


def test_default_bytes() -> None:
    assert default_max_bytes(16 << 30) == 2 << 30
    assert default_max_bytes(512 << 30) == 16 << 30
    assert default_max_bytes(0) == 1 << 30


def test_out_of_memory_drops_the_cache(tiny_model: str) -> None:
    """A batch step that runs out of memory fails its rows and drops every entry.

    Mutation caught: engine.py _step not calling self._memory_short() on
    out_of_memory (the entry stays).
    """
    import queue as q

    from mlx_serving_runtime.engine import Engine
    from mlx_serving_runtime.request import request_from_params

    out: q.Queue = q.Queue()
    eng = Engine(out.put, max_batch=2, prompt_cache_bytes=1 << 30)

    def answer(rpc_id: int) -> dict:
        while True:
            msg = out.get(timeout=60)
            if msg.get("id") == rpc_id:
                return msg

    eng.submit("load", 1, {"model": tiny_model, "id": "tiny"})
    assert "result" in answer(1)
    params = {"request_id": "oom-1", "model": "tiny", "prompt": "Oscar: " + LONG, "max_tokens": 4}
    eng.submit_generate(request_from_params(eng, 2, params))
    assert "result" in answer(2)
    assert len(eng.prompt_cache) == 1
    m = eng.model("tiny")

    def oom() -> None:
        raise RuntimeError("[metal::malloc] Attempting to allocate 1 bytes: out of memory")

    m.gen.next = oom  # the generation thread is idle: it reads m.gen only for the next step
    eng.submit_generate(request_from_params(eng, 3, {**params, "request_id": "oom-2"}))
    err = answer(3)["error"]
    assert err["data"]["code"] == "out_of_memory", err
    assert len(eng.prompt_cache) == 0 and eng.prompt_cache.bytes == 0
    eng.shutting_down = True
    eng.submit("shutdown", 4, "cancel")
    assert "result" in answer(4)
    eng.join(10)


def test_scopes_share_nothing(pair) -> None:
    """A prompt cached in one scope (tenant) is not reused by another, nor is any prefix
    of it; its own scope reuses it. Shared, cached_tokens told one tenant what another
    sent (the red team read a PIN out of another tenant's prompt that way, F1).

    Mutation caught: engine.py _start fetching without req.cache_scope, and request.py
    not reading cache_scope (either way another scope reuses the first one's tokens).
    """
    on, _ = pair
    prompt = f"Scoped: the PIN is 96279064. {LONG}"
    first = gen(on, prompt=prompt, max_tokens=8, cache_scope="tenant-b")
    n = first["usage"]["prompt_tokens"]
    assert first["usage"]["cached_tokens"] < 3
    other = gen(on, prompt=prompt, max_tokens=8, cache_scope="tenant-a")
    assert other["usage"]["cached_tokens"] < 3, other["usage"]
    prefix = gen(on, prompt=prompt[: len(prompt) // 2], max_tokens=8, cache_scope="tenant-c")
    assert prefix["usage"]["cached_tokens"] < 3, prefix["usage"]
    own = gen(on, prompt=prompt, max_tokens=8, cache_scope="tenant-b")
    assert own["usage"]["cached_tokens"] == n - 1, own["usage"]
    unscoped = gen(on, prompt=prompt, max_tokens=8)
    assert unscoped["usage"]["cached_tokens"] < 3, unscoped["usage"]
