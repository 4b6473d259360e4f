"""Work per decode step for the whole batch: one write of every row's lines, one sampler call.

In-process engines (no pipe), so each write and each sampler call can be counted.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from mlx_serving_runtime import sampling
from mlx_serving_runtime.engine import Engine
from mlx_serving_runtime.request import request_from_params


class Out:
    """Everything an engine writes: ("one", msg) per send, ("many", [msg..]) per send_many."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.results: dict[str, dict] = {}
        self.lock = threading.Lock()

    def _seen(self, msg: dict) -> None:
        r = msg.get("result") or {}
        if "finish_reason" in r:
            self.results[r["request_id"]] = r
        assert "error" not in msg, msg

    def send(self, msg: dict) -> None:
        with self.lock:
            self.events.append(("one", msg))
            self._seen(msg)

    def send_many(self, msgs: list[dict]) -> None:
        with self.lock:
            self.events.append(("many", list(msgs)))
            for m in msgs:
                self._seen(m)

    def lines(self) -> list[dict]:
        with self.lock:
            return [m for kind, x in self.events for m in ([x] if kind == "one" else x)]


def start(tiny_model: str, coalesce: bool, max_batch: int = 8) -> tuple[Engine, Out]:
    out = Out()
    eng = Engine(
        out.send, max_batch=max_batch, prompt_cache_bytes=0, send_many=out.send_many if coalesce else None
    )
    eng.submit("load", 1, {"model": tiny_model, "id": "tiny"})
    deadline = time.monotonic() + 60
    while "tiny" not in eng.model_ids():
        assert time.monotonic() < deadline, "model did not load"
        time.sleep(0.01)
    return eng, out


def run(eng: Engine, out: Out, reqs: list[dict]) -> dict[str, dict]:
    """Submit every request at once (they join one batch) and wait for all results."""
    for i, p in enumerate(reqs):
        eng.submit_generate(request_from_params(eng, 100 + i, {"model": "tiny", **p}))
    deadline = time.monotonic() + 60
    while any(p["request_id"] not in out.results for p in reqs):
        assert time.monotonic() < deadline, "generates did not finish"
        time.sleep(0.005)
    return {p["request_id"]: out.results[p["request_id"]] for p in reqs}


def stop(eng: Engine) -> None:
    eng.shutting_down = True
    eng.submit("shutdown", None, "cancel")
    eng.join(30)


def count_steps(eng: Engine) -> list[int]:
    """Counts the engine's decode steps (one BatchGenerator.next each)."""
    n = [0]
    orig = eng._step

    def step(m):
        n[0] += 1
        return orig(m)

    eng._step = step
    return n


PLAIN = [
    {
        "request_id": f"p{i}",
        "prompt": f"Story number {i}:",
        "max_tokens": 24 + i,
        "stop": ["zz"] if i % 3 == 0 else [],
    }
    for i in range(8)
]


def test_a_step_writes_its_rows_lines_at_once_and_texts_do_not_change(tiny_model: str) -> None:
    """8 concurrent generates: every chunk and result leaves in a send_many, one per step
    at most (so lines of several rows share a write), in the order each request needs
    (its chunks, then its result), and the texts equal an engine that writes line by line.

    Mutation caught: engine.py _out sending at once instead of collecting during a step
    (no chunk goes through send_many) — red at the first assert.
    """
    eng, out = start(tiny_model, coalesce=True)
    steps = count_steps(eng)
    try:
        got = run(eng, out, PLAIN)
    finally:
        stop(eng)
    ref_eng, ref_out = start(tiny_model, coalesce=False)
    try:
        want = run(ref_eng, ref_out, PLAIN)
    finally:
        stop(ref_eng)

    singles = [m for kind, m in out.events if kind == "one" and m.get("method") == "generate.chunk"]
    assert not singles, f"{len(singles)} chunks were written alone"
    writes = [msgs for kind, msgs in out.events if kind == "many"]
    assert 0 < len(writes) <= steps[0], (len(writes), steps[0])
    assert max(sum(1 for m in msgs if m.get("method") == "generate.chunk") for msgs in writes) > 1
    for rid in want:
        assert got[rid]["text"] == want[rid]["text"], rid
        assert got[rid]["usage"]["completion_tokens"] == want[rid]["usage"]["completion_tokens"]
        seen_result = False
        text = ""
        for m in out.lines():
            if m.get("method") == "generate.chunk" and m["params"]["request_id"] == rid:
                assert not seen_result, f"{rid}: a chunk after the result"
                text += m["params"]["text"]
            elif (m.get("result") or {}).get("request_id") == rid:
                seen_result = True
        assert seen_result and text == got[rid]["text"], rid


MIXED = [
    {"request_id": "greedy", "prompt": "Once upon a time", "max_tokens": 30},
    {"request_id": "seeded", "prompt": "Once upon a time", "max_tokens": 30, "temperature": 1.0, "seed": 5},
    {
        "request_id": "nucleus",
        "prompt": "Hello",
        "max_tokens": 30,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 6,
    },
    {"request_id": "min_p", "prompt": "Hello", "max_tokens": 30, "temperature": 1.2, "min_p": 0.1, "seed": 7},
    {"request_id": "top_k", "prompt": "Hello", "max_tokens": 30, "temperature": 1.0, "top_k": 5, "seed": 8},
    # Filters that leave one token: the text is the greedy one despite temperature.
    {
        "request_id": "k1",
        "prompt": "Once upon a time",
        "max_tokens": 30,
        "temperature": 1.5,
        "top_k": 1,
        "seed": 9,
    },
    {
        "request_id": "p0",
        "prompt": "Once upon a time",
        "max_tokens": 30,
        "temperature": 1.5,
        "top_p": 1e-6,
        "seed": 9,
    },
    {
        "request_id": "m1",
        "prompt": "Once upon a time",
        "max_tokens": 30,
        "temperature": 1.5,
        "min_p": 1.0,
        "seed": 9,
    },
]


@pytest.fixture()
def sampler_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every BatchSampler call."""
    sizes: list[int] = []
    orig = sampling.BatchSampler.__call__

    def call(self, logprobs):
        sizes.append(logprobs.shape[0])
        return orig(self, logprobs)

    monkeypatch.setattr(sampling.BatchSampler, "__call__", call)
    return sizes


def test_mixed_sampling_rows_share_one_batched_sampler(tiny_model: str, sampler_calls: list[int]) -> None:
    """Greedy, seeded and top_p/min_p/top_k rows decode together and are sampled in one
    call per step over the whole batch; each row's text is the one it gets alone, and a
    filter that leaves one token gives the greedy text.

    Mutations caught: engine.py _start giving each row its own sampler object (the
    per-row make_sampler that BatchSampler replaced) — mlx-lm samples row by row, no
    batched call, red at the size assert; BatchSampler._filter
    skipping top_k (or top_p, or min_p) — the k1 (p0, m1) row leaves the greedy text.
    """
    eng, out = start(tiny_model, coalesce=True)
    try:
        together = run(eng, out, MIXED)
        assert sampler_calls and max(sampler_calls) == len(MIXED), sampler_calls
        assert len(eng.model("tiny").sampler) == 0, "finished rows stay registered"
        alone = {
            p["request_id"]: run(eng, out, [{**p, "request_id": p["request_id"] + "-alone"}]) for p in MIXED
        }
    finally:
        stop(eng)
    for p in MIXED:
        rid = p["request_id"]
        assert together[rid]["text"] == alone[rid][rid + "-alone"]["text"], rid
    for rid in ("k1", "p0", "m1"):
        assert together[rid]["text"] == together["greedy"]["text"], rid
    assert together["seeded"]["text"] != together["greedy"]["text"]


CHUNK_TEXTS = [
    "",
    " plain",
    'quote " backslash \\ slash /',
    "\n\r\t\b\f \x00 \x1f \x7f",
    "é ü ß 中文 😀 \u2028 \u2029 \ufffd",
]


@pytest.mark.parametrize("text", CHUNK_TEXTS)
def test_hand_encoded_chunk_is_the_encoders_line(text: str) -> None:
    """The hot path's hand-written generate.chunk line is byte for byte json's, and other
    messages (a chunk with logprobs, a result) still go through the encoder.

    Mutation caught: protocol.py encode_line using json.encoder.encode_basestring_ascii
    (escapes non-ASCII, unlike the encoder with ensure_ascii=False) — red on the
    non-ASCII text; writing "seq" after "text" — red on every text.
    """
    import json

    from mlx_serving_runtime.protocol import encode_line, notification, response

    def generic(msg: dict) -> bytes:
        return (json.dumps(msg, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    chunk = notification(
        "generate.chunk", {"request_id": "r-1.a:b_c", "seq": 12, "text": text, "tokens": 345}
    )
    assert encode_line(chunk) == generic(chunk)
    assert json.loads(encode_line(chunk)) == chunk
    with_lp = notification(
        "generate.chunk",
        {
            "request_id": "r",
            "seq": 0,
            "text": text,
            "tokens": 1,
            "logprobs": [{"token": text, "logprob": -0.5}],
        },
    )
    assert encode_line(with_lp) == generic(with_lp)
    res = response(7, {"request_id": "r", "text": text})
    assert encode_line(res) == generic(res)
