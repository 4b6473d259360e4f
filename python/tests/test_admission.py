"""Admission: arrivals during decode join the batch together (admission.py)."""

from __future__ import annotations

import queue
from typing import Any

import pytest

from mlx_serving_runtime import admission
from mlx_serving_runtime.admission import admit_now

# (pending, oldest wait s, decoding, max_batch, max wait s) -> admit now?
CASES = [
    # An idle engine admits at once, however short the wait (TTFT at concurrency 1).
    ((1, 0.0, 0, 32, 0.010), True),
    ((5, 0.0, 0, 32, 10.0), True),
    # Arrivals during decode are held while they do not fill the batch...
    ((1, 0.0, 31 - 1, 32, 0.010), False),
    ((3, 0.005, 20, 32, 0.010), False),
    ((11, 0.0099, 20, 32, 0.010), False),
    # ...and admitted together once they fill every free row,
    ((12, 0.0, 20, 32, 0.010), True),
    ((2, 0.0, 31, 32, 0.010), True),  # more than the free rows: mlx-lm queues the rest
    ((1, 0.0, 32, 32, 0.010), True),  # no free row: as before, mlx-lm's own queue
    # ...or once the oldest has waited the bound (never longer: no starvation).
    ((1, 0.010, 20, 32, 0.010), True),
    ((3, 0.5, 20, 32, 0.010), True),
    # A bound of 0 turns holding off.
    ((1, 0.0, 20, 32, 0.0), True),
    # Nothing pending: nothing to admit.
    ((0, 1.0, 0, 32, 0.010), False),
    ((0, 1.0, 5, 32, 0.010), False),
]


@pytest.mark.parametrize(("args", "want"), CASES)
def test_admit_now(args: tuple, want: bool) -> None:
    """Mutations caught (each red here): the idle rule removed (`decoding <= 0` -> False);
    the fill rule removed; the bound compared with > instead of >=; the bound ignored."""
    assert admit_now(*args) is want


def test_resolve_wait_ms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(admission.ENV, raising=False)
    assert admission.resolve_wait_ms(None) == admission.DEFAULT_WAIT_MS
    monkeypatch.setenv(admission.ENV, "25")
    assert admission.resolve_wait_ms(None) == 25.0
    assert admission.resolve_wait_ms(0) == 0.0  # the flag wins over the env
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError):
            admission.resolve_wait_ms(bad)


class _Out:
    """The engine's send: every message, and a wait for one by rpc id or for chunks."""

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()
        self.results: dict[Any, dict] = {}
        self.chunks: dict[str, int] = {}

    def put(self, msg: dict) -> None:
        self.q.put(msg)

    def _take(self) -> None:
        msg = self.q.get(timeout=60)
        if msg.get("method") == "generate.chunk":
            rid = msg["params"]["request_id"]
            self.chunks[rid] = self.chunks.get(rid, 0) + 1
        else:
            self.results[msg.get("id")] = msg

    def answer(self, rpc_id: Any) -> dict:
        while rpc_id not in self.results:
            self._take()
        return self.results.pop(rpc_id)

    def more_chunks(self, rid: str, n: int) -> None:
        """Returns after n more chunks of rid: n more decode steps ran."""
        want = self.chunks.get(rid, 0) + n
        while self.chunks.get(rid, 0) < want:
            self._take()


PROMPTS = ["Once upon a time", "The quick brown fox jumps over", "Tell me a story about the sea and"]


def _engine(tiny_model: str, out: _Out, wait_ms: float):
    from mlx_serving_runtime.engine import Engine

    eng = Engine(out.put, max_batch=4, prompt_cache_bytes=0, admit_wait_ms=wait_ms)
    eng.submit("load", "load", {"model": tiny_model, "id": "tiny"})
    assert "result" in out.answer("load")
    return eng


def _generate(eng, rpc_id: str, prompt: str, max_tokens: int) -> None:
    from mlx_serving_runtime.request import request_from_params

    p = {"request_id": rpc_id, "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    eng.submit_generate(request_from_params(eng, rpc_id, p))


def _stop(eng, out: _Out) -> None:
    eng.shutting_down = True
    eng.submit("shutdown", "bye", "cancel")
    assert "result" in out.answer("bye")
    eng.join(10)


def test_arrivals_during_decode_are_prefilled_in_one_pass(tiny_model: str) -> None:
    """Three requests arriving steps apart while a long row decodes are prefilled in one
    pass, and their greedy texts are what each gives alone on an idle engine.

    The bound is an hour, so only the fill rule (3 pending fill the 3 free rows of a
    4-row batch) can admit them: the test does not depend on timing. Mutation caught:
    engine.py _admit starting every arrival at once (`if not force and not admit_now`
    -> `if False`): prefill sizes {1: 4}, red.
    """
    out = _Out()
    eng = _engine(tiny_model, out, wait_ms=3_600_000)
    try:
        _generate(eng, "long", "A long story:", 1500)
        out.more_chunks("long", 1)  # decoding
        for i, prompt in enumerate(PROMPTS):
            _generate(eng, f"g{i}", prompt, 24)
            out.more_chunks("long", 2)  # the engine saw it and decoded on
        texts = {}
        for i in range(len(PROMPTS)):
            r = out.answer(f"g{i}")["result"]
            assert r["usage"]["completion_tokens"] + (r["finish_reason"] == "stop") >= 1, r
            texts[i] = r["text"]
        # The long row's prefill, then one pass for all three.
        assert dict(eng.passes.prefill) == {1: 1, 3: 1}, eng.passes.summary()
        eng.submit("cancel", "c", "long")
        assert out.answer("c")["result"]["cancelled"] is True
        assert out.answer("long")["result"]["finish_reason"] == "cancelled"
        # Greedy: the same text alone on an idle engine (admitted at once, alone).
        for i, prompt in enumerate(PROMPTS):
            _generate(eng, f"alone{i}", prompt, 24)
            assert out.answer(f"alone{i}")["result"]["text"] == texts[i], i
        assert dict(eng.passes.prefill) == {1: 4, 3: 1}
    finally:
        _stop(eng, out)


def test_held_arrival_is_cancelled_and_bounded(tiny_model: str) -> None:
    """A held request can be cancelled before it starts, and a held one is admitted at
    the bound without filling the batch (a bound of 0: at the next step).

    Mutation caught: engine.py _cancel not looking in the held list (the held request
    is answered `cancelled: false` and runs to its end), red.
    """
    out = _Out()
    eng = _engine(tiny_model, out, wait_ms=3_600_000)
    try:
        _generate(eng, "long", "A long story:", 1500)
        out.more_chunks("long", 1)
        _generate(eng, "held", "Once upon a time", 24)
        out.more_chunks("long", 2)
        eng.submit("cancel", "c", "held")
        assert out.answer("c")["result"]["cancelled"] is True
        r = out.answer("held")["result"]
        assert r["finish_reason"] == "cancelled" and r["usage"]["completion_tokens"] == 0, r
        assert dict(eng.passes.prefill) == {1: 1}  # it never reached the generator
        # With no bound, one arrival during decode is admitted at the next step alone.
        eng.admit_wait_s = 0.0
        _generate(eng, "next", "Once upon a time", 8)
        assert out.answer("next")["result"]["finish_reason"] in ("length", "stop")
        assert dict(eng.passes.prefill) == {1: 2}
        eng.submit("cancel", "c2", "long")
        assert out.answer("c2")["result"]["cancelled"] is True
        assert out.answer("long")["result"]["finish_reason"] == "cancelled"
    finally:
        _stop(eng, out)


def test_held_arrival_starts_when_the_last_row_ends(tiny_model: str) -> None:
    """A request held while one row decodes is started when that row ends by itself,
    though it neither fills the batch nor waits out the bound (an hour).

    Mutation caught: engine.py _run blocking for new commands while requests are held
    (`and not self._held` dropped from the idle check): the held request never starts
    and its answer never comes (the wait for it times out), red. This hung the closed-
    loop bench at concurrency 8 with 32 slots before it was fixed.
    """
    out = _Out()
    eng = _engine(tiny_model, out, wait_ms=3_600_000)
    try:
        _generate(eng, "short", "A long story:", 40)
        out.more_chunks("short", 1)
        _generate(eng, "late", "Once upon a time", 8)
        assert out.answer("short")["result"]["finish_reason"] in ("length", "stop")
        assert out.answer("late")["result"]["finish_reason"] in ("length", "stop")
        assert dict(eng.passes.prefill) == {1: 2}
    finally:
        _stop(eng, out)
