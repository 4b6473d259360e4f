"""The `direct` path of `mlx-serving bench`: mlx-lm in-process, no pipe, no bus.

Usage: python python/bench/direct_load.py --model DIR --max-batch N < load.json > samples.json

load.json is {"levels": [{"concurrency": C, "requests": [{"prompt": str, "max_tokens": int}, ...]}, ...]}.
The requests run as a closed loop of C clients over one BatchGenerator as mlx-lm's
users run it (EOS stops a row, its default batched greedy sampler, no logits processors,
one detokenizer per request, as many rows at once as the runtime's --max-batch), so the
runtime is measured against mlx-lm at its fastest. Each level is warmed up first with
its own concurrency. Times are seconds on one monotonic clock, relative to the start:
{"levels": [{"wall": s, "samples": [{"start": s, "events": [[s, n], ...], "end": s, "tokens": n}]}, ...]}:
an event is new text appearing (n tokens since the previous one), as the runtime streams it,
so TTFT means the same on every path: time to the first visible text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-batch", type=int, default=32)
    a = ap.parse_args()
    load = json.load(sys.stdin)

    import mlx.core as mx
    from mlx_lm import load as load_model
    from mlx_lm.generate import BatchGenerator

    from mlx_serving_runtime.admission import PassCounter

    passes = PassCounter()  # prefill passes, reported to $MLX_SERVING_PASS_STATS when set
    model, tok = load_model(a.model)
    eos = sorted(tok.eos_token_ids)
    gen = BatchGenerator(
        model,
        stop_tokens=[[t] for t in eos],
        completion_batch_size=a.max_batch,
        prefill_batch_size=a.max_batch,
        stream=mx.default_stream(mx.default_device()),
    )

    # mlx-lm as its users run it: one BatchGenerator, its default sampler (argmax over
    # the whole batch in one call), no logits processors. A per-row processor would put
    # every row on mlx-lm's slow per-row path and flatter the runtime's ratio.
    def run(reqs: list[dict], concurrency: int) -> tuple[list[dict], float]:
        out = [{"start": 0.0, "events": [], "end": 0.0, "tokens": 0} for _ in reqs]
        pending = [0] * len(reqs)  # tokens since the last event
        live: dict[int, tuple[int, object]] = {}
        nxt = 0
        t0 = time.perf_counter()

        def admit() -> None:
            nonlocal nxt
            while nxt < len(reqs) and len(live) < concurrency:
                r = reqs[nxt]
                out[nxt]["start"] = time.perf_counter() - t0
                (uid,) = gen.insert([tok.encode(r["prompt"])], max_tokens=[r["max_tokens"]])
                live[uid] = (nxt, tok.detokenizer)
                nxt += 1

        admit()
        while live:
            t = time.perf_counter()
            prompts, gens = gen.next()
            passes.step(prompts, len(gens), time.perf_counter() - t)
            for g in gens:
                i, det = live[g.uid]
                now = time.perf_counter() - t0
                if g.finish_reason != "stop":
                    det.add_token(g.token)
                    out[i]["tokens"] += 1
                    pending[i] += 1
                    # An event when text appears, as the runtime streams it: the detokenizer
                    # holds back bytes that are not yet valid UTF-8 (often, on random weights).
                    if det.last_segment:
                        out[i]["events"].append([now, pending[i]])
                        pending[i] = 0
                if g.finish_reason is not None:
                    det.finalize()
                    if pending[i] or not out[i]["events"]:
                        out[i]["events"].append([now, max(pending[i], 1)])
                        pending[i] = 0
                    out[i]["end"] = now
                    del live[g.uid]
            admit()
        return out, time.perf_counter() - t0

    # Warm-up: every distinct prompt once (each new length compiles new shapes),
    # as the other paths do, before anything is timed.
    seen = {r["prompt"]: None for lv in load["levels"] for r in lv["requests"]}
    run([{"prompt": p, "max_tokens": 8} for p in seen], 1)
    levels = []
    for lv in load["levels"]:
        c = int(lv["concurrency"])
        # Warm-up per level: batch sizes new to this level compile new shapes.
        run([dict(r, max_tokens=8) for r in lv["requests"][:c]], c)
        samples, wall = run(lv["requests"], c)
        levels.append({"wall": wall, "samples": samples})
    passes.dump_to_env("direct")
    json.dump({"levels": levels}, sys.stdout)
    gen.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
