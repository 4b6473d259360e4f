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


def test_a_raising_processor_fails_its_row_only(tiny_model: str, monkeypatch) -> None:
    """One row's logits processor raises inside the batch step (the review's case: a
    presence_penalty on a model whose output is wider than the vocab_size the runtime
    read): that request fails generation_failed, naming the processor, and the two plain
    rows batched with it complete.

    Mutation caught: engine.py _start without the RowGuard wrapping (the step raises:
    every row batch_failed, retried, and the offender poisons the next batch too): red.
    """
    from mlx_serving_runtime import sampling

    def broken(self, tokens, logits):
        raise ValueError("[broadcast_shapes] Shapes (1,448) and (440) cannot be broadcast.")

    monkeypatch.setattr(sampling.OpenAIPenalties, "__call__", broken)
    eng, out = start(tiny_model)
    params = {"model": "tiny", "max_tokens": 16}
    eng.submit_generate(
        request_from_params(eng, 2, {**params, "request_id": "pen", "prompt": "A:", "presence_penalty": 0.5})
    )
    eng.submit_generate(request_from_params(eng, 3, {**params, "request_id": "p1", "prompt": "B:"}))
    eng.submit_generate(request_from_params(eng, 4, {**params, "request_id": "p2", "prompt": "C:"}))
    err = answer(out, 2)["error"]
    assert err["data"]["code"] == "generation_failed", err
    assert "logits processor: ValueError: [broadcast_shapes]" in err["message"], err
    for rpc_id in (3, 4):
        assert answer(out, rpc_id)["result"]["finish_reason"] in ("length", "stop")
    stop(eng, out)


def test_penalties_fit_logits_wider_than_the_vocab() -> None:
    """OpenAIPenalties built for a vocabulary narrower than the model's output (the
    tokenizer's length when config has no vocab_size) penalises the ids it counted and
    leaves the rest, instead of raising on the subtraction in every step.

    Mutation caught: sampling.py without the counts' growth to the logits' width: red.
    """
    import mlx.core as mx

    from mlx_serving_runtime.sampling import OpenAIPenalties

    pen = OpenAIPenalties(8, presence=1.0, prior=[3])
    logits = mx.zeros((1, 12))
    out = pen(mx.array([1, 2, 3]), logits)
    assert out.shape == (1, 12)
    assert out[0, 3].item() == -1.0 and out[0, 11].item() == 0.0
    out = pen(mx.array([1, 2, 3, 10]), logits)  # id 10, past the narrow vocab, sampled
    assert out[0, 10].item() == -1.0


def test_vocab_size_reads_text_config() -> None:
    """Mutation caught: models.py vocab_size ignoring text_config (the tokenizer's 440)."""
    from mlx_serving_runtime.models import vocab_size

    assert vocab_size({"vocab_size": 448}, 440) == 448
    assert vocab_size({"text_config": {"vocab_size": 262208}}, 262145) == 262208
    assert vocab_size({}, 440) == 440
