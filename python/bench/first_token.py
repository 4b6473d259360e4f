"""Time mlx-lm's first token (one BatchGenerator, no runtime) for prompt lengths seen before
against new ones, and for a multi-turn chat with and without a reused KV cache, once per
prefill mode of the runtime (mlx_serving_runtime/prefill.py: plain, unfused, buckets),
each mode in its own process so MLX's per-shape caches start empty.

Columns (ms to the first token; lists are medians): first_ever, the process's first
prompt (tokens long); same, that length again; new, lengths tokens+1, +2, ...; new_far,
lengths near tokens/2 (a new bucket first); short, 8-12 tokens; chatN_cached, the turns
of a chat whose history comes from the previous turn's KV cache; chatN_fresh, the same
prompts computed whole. The system prompt is tokens long; user turns are TURNS long.

Usage: python python/bench/first_token.py --model DIR [--tokens 1088] [--trials 5]
       [--modes plain,unfused,buckets,buckets+unfused] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TURNS = ([37, 61, 23, 90, 45, 70], [29, 83, 52, 41, 66, 33])  # user-turn lengths, two chats


def one(a: argparse.Namespace) -> dict:
    import mlx.core as mx
    from mlx_lm import load

    from mlx_serving_runtime import prefill

    mode, _, extra = a.one.partition("+")  # "buckets+unfused": both, cuDNN off and padded
    prefill.apply(mode)
    if extra:
        prefill.apply(extra)
    model, tok = load(a.model)
    gen = prefill.new_generator(
        model,
        mode,
        stop_tokens=[[t] for t in tok.eos_token_ids],
        stream=mx.default_stream(mx.default_device()),
    )
    base = [(7 * i) % 200 + 3 for i in range(a.tokens * 3)]

    def run(prompt, max_tokens=2, cache=None, history=None):
        """(ms to the first token, the finished row's (cache, tokens))."""
        t0 = time.perf_counter()
        (uid,) = gen.insert(
            [prompt],
            max_tokens=[max_tokens],
            caches=[cache] if cache is not None else None,
            all_tokens=[history] if cache is not None else None,
        )
        dt, done = None, None
        while done is None:
            for r in gen.next()[1]:
                if r.uid == uid and dt is None:
                    dt = (time.perf_counter() - t0) * 1000
                if r.uid == uid and r.finish_reason is not None:
                    done = (r.prompt_cache, r.all_tokens)
        return dt, done

    out: dict = {"mode": a.one, "device": str(mx.default_device()), "tokens": a.tokens}
    out["first_ever"] = run(base[: a.tokens])[0]
    out["same"] = [run(base[: a.tokens])[0] for _ in range(a.trials)]
    out["new"] = [run(base[: a.tokens + 1 + i])[0] for i in range(a.trials)]
    out["new_far"] = [run(base[: a.tokens // 2 + 7 * i])[0] for i in range(a.trials)]
    out["short"] = [run(base[: 8 + i])[0] for i in range(a.trials)]
    for c, turns in enumerate(TURNS):
        cached, fresh = [], []
        system = base[: a.tokens]
        dt, (cache, hist) = run(system, max_tokens=16)
        for i, n in enumerate(turns):
            user = [(13 * j + 5 * i + c) % 300 + 3 for j in range(n)]
            full = list(hist) + user
            fresh.append(run(full)[0])
            dt, (cache, hist) = run(user, max_tokens=16, cache=cache, history=list(hist))
            cached.append(dt)
        out[f"chat{c + 1}_cached"] = cached
        out[f"chat{c + 1}_fresh"] = fresh
    gen.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=1088)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--modes", default="plain,unfused,buckets")
    ap.add_argument("--json", default="")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a)), flush=True)
        return
    rows = []
    for mode in a.modes.split(","):
        env = {k: v for k, v in os.environ.items() if k != "MLX_CUDA_USE_CUDNN_SDPA"}
        args = [sys.argv[0], "--model", a.model, "--tokens", str(a.tokens), "--trials", str(a.trials)]
        p = subprocess.run([sys.executable, *args, "--one", mode], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            print(f"mode {mode} failed:\n{p.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    med = statistics.median
    print(f"ms to the first token, median of each list (prompt {a.tokens} tokens, {rows[0]['device']})")
    keys = ["first_ever", "same", "new", "new_far", "short"]
    keys += [f"chat{c + 1}_{k}" for c in range(len(TURNS)) for k in ("cached", "fresh")]
    print("| mode | " + " | ".join(keys) + " |")
    for r in rows:
        vals = [r[k] if isinstance(r[k], float) else med(r[k]) for k in keys]
        print(f"| {r['mode']} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    for r in rows:
        print(r["mode"], {k: [round(x, 1) for x in r[k]] for k in keys[1:]})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
