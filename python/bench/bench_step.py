"""Per-step cost of the runtime's engine against a plain BatchGenerator loop, in-process.

No pipe and no Go: the engine (output encoded by the real Writer into /dev/null) and
mlx-lm as its users run it (one BatchGenerator, no processors, a detokenizer per row),
each decoding --concurrency rows of --max-tokens. Printed per side, as one JSON line:
tokens/s (wall), CPU microseconds per token of the generating thread, and of that the
part spent outside BatchGenerator.next (the serving layer's own Python work per token).

    python/.venv/bin/python python/bench/bench_step.py --model .cache/tiny-model \\
        --side runtime --concurrency 32 --temperature 0.8

--temperature > 0 gives every row a seed (as the runtime does when none is asked), so
rows sample with temperature; direct uses its shared default sampler (argmax) either
way. To compare two versions of the runtime, run this file with PYTHONPATH pointing at
each one's python/ directory, alternately, several times.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

PROMPT = "Once upon a time, in a land far away,"
_inside = [0.0]
_next = BatchGenerator.next


def _timed_next(self):
    t = time.thread_time()
    try:
        return _next(self)
    finally:
        _inside[0] += time.thread_time() - t


BatchGenerator.next = _timed_next


def direct(model_dir: str, n: int, max_tokens: int) -> tuple[int, float, float]:
    from mlx_lm import load

    model, tok = load(model_dir)
    gen = BatchGenerator(
        model,
        stop_tokens=[[t] for t in tok.eos_token_ids],
        completion_batch_size=n,
        prefill_batch_size=n,
        stream=mx.default_stream(mx.default_device()),
    )

    def run(t: int) -> tuple[int, float, float]:
        live = {}
        c0, w0 = time.thread_time(), time.perf_counter()
        for i in range(n):
            (uid,) = gen.insert([tok.encode(f"{PROMPT}{i}")], max_tokens=[t])
            live[uid] = tok.detokenizer
        count = 0
        while live:
            for g in gen.next()[1]:
                d = live[g.uid]
                if g.finish_reason != "stop":
                    d.add_token(g.token)
                    _ = d.last_segment
                    count += 1
                if g.finish_reason is not None:
                    d.finalize()
                    del live[g.uid]
        return count, time.thread_time() - c0, time.perf_counter() - w0

    run(8)
    _inside[0] = 0.0
    return run(max_tokens)


def runtime(model_dir: str, n: int, max_tokens: int, temperature: float) -> tuple[int, float, float]:
    from mlx_serving_runtime.engine import Engine
    from mlx_serving_runtime.protocol import Writer
    from mlx_serving_runtime.request import request_from_params

    w = Writer(open(os.devnull, "wb", buffering=0))
    done = threading.Event()
    results: dict[str, dict] = {}

    def seen(msg: dict) -> None:
        if "error" in msg:
            raise SystemExit(f"error: {msg}")
        r = msg.get("result")
        if r and "finish_reason" in r:
            results[r["request_id"]] = r
            if len(results) == n:
                done.set()

    def send(msg: dict) -> None:
        w.send(msg)
        seen(msg)

    def send_many(msgs: list[dict]) -> None:
        w.send_many(msgs)
        for m in msgs:
            seen(m)

    # An engine from before send_many existed writes line by line.
    kw = {"send_many": send_many} if "send_many" in Engine.__init__.__code__.co_varnames else {}
    e = Engine(send, max_batch=n, prompt_cache_bytes=0, **kw)
    e.submit("load", 0, {"model": model_dir, "id": "m"})
    while "m" not in e.model_ids():
        time.sleep(0.01)
    clock = time.pthread_getcpuclockid(e._thread.ident)

    def go(t: int, tag: str) -> tuple[int, float, float]:
        results.clear()
        done.clear()
        reqs = [
            request_from_params(
                e,
                i,
                {
                    "request_id": f"{tag}{i}",
                    "model": "m",
                    "prompt": f"{PROMPT}{i}",
                    "max_tokens": t,
                    "temperature": temperature,
                },
            )
            for i in range(n)
        ]
        c0, w0 = time.clock_gettime(clock), time.perf_counter()
        for r in reqs:
            e.submit_generate(r)
        done.wait()
        tokens = sum(r["usage"]["completion_tokens"] for r in results.values())
        return tokens, time.clock_gettime(clock) - c0, time.perf_counter() - w0

    go(8, "w")
    _inside[0] = 0.0
    return go(max_tokens, "r")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--side", choices=("direct", "runtime"), required=True)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--label", default="", help="a name for this side in the output (e.g. before/after)")
    a = ap.parse_args()
    if a.side == "direct":
        tokens, cpu, wall = direct(a.model, a.concurrency, a.max_tokens)
    else:
        tokens, cpu, wall = runtime(a.model, a.concurrency, a.max_tokens, a.temperature)
    out = {
        "side": a.side,
        "label": a.label,
        "concurrency": a.concurrency,
        "temperature": a.temperature,
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "cpu_us_per_token": round(cpu / tokens * 1e6, 2),
        "outside_next_us_per_token": round((cpu - _inside[0]) / tokens * 1e6, 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
