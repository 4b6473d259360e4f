"""Admission: arrivals during decode join the batch together (admission.py)."""

from __future__ import annotations

import queue
from collections import Counter
from typing import Any

import pytest

from mlx_serving_runtime import admission
from mlx_serving_runtime.admission import admit_now

# (pending, oldest wait s, decoding, max_batch, max wait s, expected) -> admit now?
CASES = [
    # An idle engine admits at once, however short the wait (TTFT at concurrency 1).
    ((1, 0.0, 0, 32, 0.010, 5), True),
    ((5, 0.0, 0, 32, 10.0, 31), True),
    # Arrivals during decode are held while fewer than the rows that ended recently...
    ((1, 0.0, 30, 32, 0.010, 5), False),
    ((3, 0.005, 20, 32, 0.010, 10), False),
    ((11, 0.0099, 20, 32, 0.010, 31), False),
    # ...and admitted together once every awaited replacement is here,
    ((3, 0.0, 20, 32, 0.010, 3), True),
    # or they fill every free row (more than free: mlx-lm queues the rest),
    ((12, 0.0, 20, 32, 0.010, 31), True),
    ((2, 0.0, 31, 32, 0.010, 5), True),
    ((1, 0.0, 32, 32, 0.010, 5), True),
    # or the oldest has waited the bound (never longer: no starvation).
    ((1, 0.010, 20, 32, 0.010, 5), True),
    ((3, 0.5, 20, 32, 0.010, 10), True),
    # No row ended recently: nothing is awaited, an arrival goes in at once.
    ((1, 0.0, 20, 32, 0.010, 0), True),
    # A bound of 0 turns holding off.
    ((1, 0.0, 20, 32, 0.0, 5), True),
    # Nothing pending: nothing to admit.
    ((0, 1.0, 0, 32, 0.010, 0), False),
    ((0, 1.0, 5, 32, 0.010, 3), False),
]


@pytest.mark.parametrize(("args", "want"), CASES)
def test_admit_now(args: tuple, want: bool) -> None:
    """Mutations caught (each red here): the idle rule removed (`decoding <= 0` -> no
    admit); the fill/expected rule removed; `expected` ignored (min over free rows only);
    the bound compared with > instead of >=; the bound ignored."""
    assert admit_now(*args) is want


def test_expected_counts_recent_unreplaced_ends() -> None:
    """Mutation caught: Expected.count not expiring old ends (3, not 0, at the end)."""
    e = admission.Expected()
    e.ended(3, now=0.0)
    assert e.count(now=0.005, window_s=0.010) == 3
    e.admitted(2)
    assert e.count(now=0.005, window_s=0.010) == 1
    e.admitted(5)  # more arrivals than ends: nothing below zero
    assert e.count(now=0.005, window_s=0.010) == 0
    e.ended(3, now=1.0)
    assert e.count(now=1.5, window_s=0.5) == 3
    assert e.count(now=1.75, window_s=0.5) == 0  # older than the bound: not awaited


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


def _end_short_rows(eng, out: _Out, tag: str, n: int = 2) -> None:
    """n rows that start together (within a step or two: nothing is awaited yet, so each
    goes in at once) and end while the long one decodes: n replacements are awaited."""
    for i in range(n):
        _generate(eng, f"{tag}{i}", "Hello there", 12)
    for i in range(n):
        assert out.answer(f"{tag}{i}")["result"]["finish_reason"] in ("length", "stop")


def test_arrivals_during_decode_are_prefilled_in_one_pass(tiny_model: str) -> None:
    """Three requests arriving steps apart, after three rows ended while a long row
    decodes, are prefilled in one pass, and their greedy texts are what each gives alone
    on an idle engine.

    The bound is an hour, so only the rule "every awaited replacement is here" (3 ended,
    3 arrive) can admit them: the test does not depend on timing. Mutation caught:
    engine.py _admit starting every arrival at once (`if not force and not admit_now`
    -> `if False`): the three are prefilled in passes of 1, red.
    """
    out = _Out()
    eng = _engine(tiny_model, out, wait_ms=3_600_000)
    try:
        _generate(eng, "long", "A long story:", 1500)
        out.more_chunks("long", 1)  # decoding
        _end_short_rows(eng, out, "s", 3)  # three replacements awaited
        before = Counter(eng.passes.prefill)
        for i, prompt in enumerate(PROMPTS):
            _generate(eng, f"g{i}", prompt, 24)
            out.more_chunks("long", 2)  # the engine saw it and decoded on
        texts = {}
        for i in range(len(PROMPTS)):
            r = out.answer(f"g{i}")["result"]
            assert r["usage"]["completion_tokens"] + (r["finish_reason"] == "stop") >= 1, r
            texts[i] = r["text"]
        assert dict(Counter(eng.passes.prefill) - before) == {3: 1}, eng.passes.summary()
        eng.submit("cancel", "c", "long")
        assert out.answer("c")["result"]["cancelled"] is True
        assert out.answer("long")["result"]["finish_reason"] == "cancelled"
        # Greedy: the same text alone on an idle engine (admitted at once, alone).
        for i, prompt in enumerate(PROMPTS):
            _generate(eng, f"alone{i}", prompt, 24)
            assert out.answer(f"alone{i}")["result"]["text"] == texts[i], i
    finally:
        _stop(eng, out)


def test_arrival_with_nothing_awaited_goes_in_at_once(tiny_model: str) -> None:
    """With no row ended recently an arrival during decode is admitted at the next step,
    though it fills nothing and the bound is an hour (else a partial load pays the bound).

    Mutation caught: admission.py admit_now ignoring `expected` (min over free rows
    only): the arrival waits for the long row to end, red (its answer comes after the
    long row's cancel, not before).
    """
    out = _Out()
    eng = _engine(tiny_model, out, wait_ms=3_600_000)
    try:
        _generate(eng, "long", "A long story:", 1500)
        out.more_chunks("long", 1)
        _generate(eng, "fresh", "Once upon a time", 8)
        assert out.answer("fresh")["result"]["finish_reason"] in ("length", "stop")
        assert "long" not in {m.get("id") for m in out.results.values()}  # still decoding
        eng.submit("cancel", "c", "long")
        assert out.answer("c")["result"]["cancelled"] is True
    finally:
        _stop(eng, out)


def test_held_arrival_is_cancelled_and_bounded(tiny_model: str) -> None:
    """A held request can be cancelled before it starts, and a held one is admitted at
    the bound (a bound of 0: at the next step).

    Mutation caught: engine.py _cancel not looking in the held list (the held request
    is answered `cancelled: false` and runs to its end), red.
    """
    out = _Out()
    eng = _engine(tiny_model, out, wait_ms=3_600_000)
    try:
        _generate(eng, "long", "A long story:", 1500)
        out.more_chunks("long", 1)
        _end_short_rows(eng, out, "s")
        before = Counter(eng.passes.prefill)
        _generate(eng, "held", "Once upon a time", 24)
        out.more_chunks("long", 2)
        eng.submit("cancel", "c", "held")
        assert out.answer("c")["result"]["cancelled"] is True
        r = out.answer("held")["result"]
        assert r["finish_reason"] == "cancelled" and r["usage"]["completion_tokens"] == 0, r
        assert Counter(eng.passes.prefill) == before  # it never reached the generator
        # With no bound, one arrival during decode is admitted at the next step alone.
        eng.admit_wait_s = 0.0
        _end_short_rows(eng, out, "t")
        _generate(eng, "next", "Once upon a time", 8)
        assert out.answer("next")["result"]["finish_reason"] in ("length", "stop")
        eng.submit("cancel", "c2", "long")
        assert out.answer("c2")["result"]["cancelled"] is True
        assert out.answer("long")["result"]["finish_reason"] == "cancelled"
    finally:
        _stop(eng, out)


def test_held_arrival_starts_when_the_last_row_ends(tiny_model: str) -> None:
    """A request held while one row decodes is started when that row ends by itself,
    though it is not all that is awaited and the bound (an hour) has not passed.

    Mutation caught: engine.py _run blocking for new commands while requests are held
    (`and not self._held` dropped from the idle check): the held request never starts
    and its answer never comes (the wait for it times out), red. This hung the closed-
    loop bench at concurrency 8 with 32 slots before it was fixed.
    """
    out = _Out()
    eng = _engine(tiny_model, out, wait_ms=3_600_000)
    try:
        _generate(eng, "short", "A long story:", 60)
        out.more_chunks("short", 1)
        _end_short_rows(eng, out, "s")
        _generate(eng, "late", "Once upon a time", 8)
        assert out.answer("short")["result"]["finish_reason"] in ("length", "stop")
        assert out.answer("late")["result"]["finish_reason"] in ("length", "stop")
    finally:
        _stop(eng, out)
