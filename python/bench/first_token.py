"""Time mlx-lm's own first token (one BatchGenerator, no runtime) for prompts of a length
seen before against prompts of a new length, to tell prefill cost from per-shape compiles.

Usage: python python/bench/first_token.py --model DIR [--tokens 1088] [--trials 5]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=1088)
    ap.add_argument("--trials", type=int, default=5)
    a = ap.parse_args()

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    model, tok = load(a.model)
    gen = BatchGenerator(
        model, stop_tokens=[[t] for t in tok.eos_token_ids], stream=mx.default_stream(mx.default_device())
    )
    base = [(7 * i) % 200 + 3 for i in range(a.tokens + a.trials + 2)]

    def first_token(prompt: list[int]) -> float:
        t0 = time.perf_counter()
        gen.insert([prompt], max_tokens=[2])
        while not gen.next()[1]:
            pass
        dt = (time.perf_counter() - t0) * 1000
        while any(gen.next()):
            pass
        return dt

    first_token(base[: a.tokens])  # warm-up
    same = [first_token(base[: a.tokens]) for _ in range(a.trials)]
    new = [first_token(base[: a.tokens + 1 + i]) for i in range(a.trials)]
    short = [first_token(base[:8]) for _ in range(a.trials)]
    print(
        f"device {mx.default_device()}, prompt {a.tokens} tokens,",
        f"ms to the first token (median of {a.trials}):",
    )
    print(f"  same length each time: {statistics.median(same):.1f}  {[round(x, 1) for x in same]}")
    print(f"  a new length each time: {statistics.median(new):.1f}  {[round(x, 1) for x in new]}")
    print(f"  8-token prompt: {statistics.median(short):.1f}")
    gen.close()


if __name__ == "__main__":
    main()
