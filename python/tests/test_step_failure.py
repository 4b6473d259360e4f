"""A decode step that raises, and a generation thread that dies.

In-process engines (no pipe): the step's BatchGenerator.next is wrapped to raise, and the
test reads what each request was answered.
"""

from __future__ import annotations

import queue
import threading

from mlx_serving_runtime.engine import Engine
from mlx_serving_runtime.request import request_from_params


def start(tiny_model: str) -> tuple[Engine, queue.Queue]:
    out: queue.Queue = queue.Queue()
    eng = Engine(out.put, max_batch=4, prompt_cache_bytes=0)
    eng.submit("load", 1, {"model": tiny_model, "id": "tiny"})
    assert "result" in answer(out, 1)
    return eng, out


def answer(out: queue.Queue, rpc_id: int) -> dict:
    while True:
        msg = out.get(timeout=60)
        if msg.get("id") == rpc_id:
            return msg


def stop(eng: Engine, out: queue.Queue) -> None:
    eng.shutting_down = True
    eng.submit("shutdown", 999, "cancel")
    assert "result" in answer(out, 999)
    eng.join(10)


def raise_once_at(eng: Engine, rows: int) -> threading.Event:
    """Makes the model's next decode step that holds `rows` rows raise, once."""
    m = eng.model("tiny")
    orig, fired = m.gen.next, threading.Event()

    def step():
        if not fired.is_set() and len(eng._by_uid) == rows:
            fired.set()
            raise RuntimeError("boom")
        return orig()

    m.gen.next = step  # the generation thread reads m.gen for each step
    return fired


def generate(eng: Engine, rpc_id: int, request_id: str, max_tokens: int = 64) -> None:
    params = {
        "request_id": request_id,
        "model": "tiny",
        "prompt": f"Story {request_id}:",
        "max_tokens": max_tokens,
    }
    eng.submit_generate(request_from_params(eng, rpc_id, params))


def test_a_failed_step_of_several_rows_fails_each_retryable(tiny_model: str) -> None:
    """Two rows in one step that raises: each is answered batch_failed (retryable: which
    row caused it is unknown, and the other tenant's job must not fail for good with it),
    and the model takes the next request on a fresh generator.

    Mutation caught: engine.py _step's code without the `len(rows) > 1` branch (every
    row generation_failed, as before): red.
    """
    eng, out = start(tiny_model)
    fired = raise_once_at(eng, 2)
    generate(eng, 2, "a")
    generate(eng, 3, "b")
    for rpc_id in (2, 3):
        err = answer(out, rpc_id)["error"]
        assert err["data"]["code"] == "batch_failed", err
        assert "a decode step of 2 rows raised RuntimeError: boom" in err["message"], err
    assert fired.is_set()
    generate(eng, 4, "c", max_tokens=4)
    assert answer(out, 4)["result"]["finish_reason"] in ("length", "stop")
    stop(eng, out)


def test_a_failed_step_of_one_row_fails_it_for_good(tiny_model: str) -> None:
    """A row alone in a step that raises caused it (or met a passing fault): it is answered
    generation_failed, not retryable, so a job that breaks every step it is in does not
    come back for every attempt alone.

    Mutation caught: batch_failed for a single row (`len(rows) > 1` → `len(rows) > 0`): red.
    """
    eng, out = start(tiny_model)
    raise_once_at(eng, 1)
    generate(eng, 2, "alone")
    err = answer(out, 2)["error"]
    assert err["data"]["code"] == "generation_failed", err
    stop(eng, out)


def test_a_dead_generation_thread_calls_on_crash(tiny_model: str) -> None:
    """An exception no handler of the generation loop takes ends the thread; on_crash is
    called on it (__main__ exits the process then, so the worker restarts the runtime and
    retries its jobs) instead of leaving every request waiting on a thread that is gone.

    Mutation caught: engine.py _run without its except (the thread dies quietly): red.
    """
    eng, out = start(tiny_model)
    crashed = threading.Event()
    eng.on_crash = crashed.set

    def admit(force: bool = False) -> None:
        raise RuntimeError("a bug in admission")

    eng._admit = admit  # called on every turn of the loop
    generate(eng, 2, "x")
    assert crashed.wait(30), "on_crash was not called"
    eng.join(10)
    assert not eng._thread.is_alive()
