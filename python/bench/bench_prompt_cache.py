"""TTFT with a shared prompt prefix, prompt cache on vs off, measured in one run.

Two runtimes (--prompt-cache-bytes default vs 0) load the same model; each gets the same
sequence of requests: one shared prefix (about --prefix-tokens tokens, like a long system
prompt) followed by a different question each time. The first request of each runtime
warms it; the rest are timed (the runtime's own ttft_ms and the client's wall time to
the first chunk). Runtimes are driven alternately, request by request, so load on the
machine hits both alike.

    python/.venv/bin/python python/bench/bench_prompt_cache.py --model .cache/tiny-model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class Runtime:
    def __init__(self, *args: str) -> None:
        env = dict(os.environ, MLX_SERVING_SCHEMAS=str(REPO / "schemas"), MLX_SERVING_LOG_LEVEL="WARNING")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_serving_runtime", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._id = 0
        self._lock = threading.Lock()

    def call(self, method: str, params: dict) -> tuple[dict, float | None, float]:
        """(result, seconds to the first chunk or None, seconds to the result)."""
        with self._lock:
            self._id += 1
            rpc = self._id
        t0 = time.perf_counter()
        msg = {"jsonrpc": "2.0", "id": rpc, "method": method, "params": params}
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()
        first = None
        for line in self.proc.stdout:
            m = json.loads(line)
            if m.get("method") == "generate.chunk" and first is None:
                first = time.perf_counter() - t0
            if m.get("id") == rpc:
                if "error" in m:
                    raise RuntimeError(m["error"])
                return m["result"], first, time.perf_counter() - t0
        raise RuntimeError("runtime exited")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / ".cache" / "tiny-model"))
    p.add_argument("--prefix-tokens", type=int, default=1000)
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=8)
    a = p.parse_args()

    on, off = Runtime(), Runtime("--prompt-cache-bytes", "0")
    try:
        for rt in (on, off):
            rt.call("model.load", {"model": a.model, "id": "m"})
        # Grow the shared prefix to the asked token count.
        words, prefix = 0, ""
        while True:
            prefix = "Rules of the house: " + " ".join(f"rule {i} is to be exact" for i in range(words))
            n = on.call("tokenize", {"model": "m", "text": prefix})[0]["count"]
            if n >= a.prefix_tokens:
                break
            words += max(1, (a.prefix_tokens - n) // 40)
        ttft: dict[str, list[float]] = {"on": [], "off": []}
        wall: dict[str, list[float]] = {"on": [], "off": []}
        cached: list[int] = []
        prompt_tokens = 0
        for i in range(a.requests + 1):
            for name, rt in (("on", on), ("off", off)):
                res, first, _ = rt.call(
                    "generate",
                    {
                        "request_id": f"{name}-{i}",
                        "model": "m",
                        "prompt": f"{prefix}\nQuestion {i}: what is rule {i}?",
                        "max_tokens": a.max_tokens,
                    },
                )
                if i == 0:
                    continue  # warm-up: fills the cache of `on`
                ttft[name].append(res["timings"]["ttft_ms"])
                wall[name].append((first or 0) * 1000)
                if name == "on":
                    cached.append(res["usage"]["cached_tokens"])
                    prompt_tokens = res["usage"]["prompt_tokens"]
        med = {k: statistics.median(v) for k, v in ttft.items()}
        medw = {k: statistics.median(v) for k, v in wall.items()}
        stats = on.call("health", {})[0]["prompt_cache"]
        print(
            json.dumps(
                {
                    "prompt_tokens": prompt_tokens,
                    "cached_tokens_median": statistics.median(cached),
                    "requests": a.requests,
                    "ttft_ms_median": med,
                    "first_chunk_ms_median": medw,
                    "speedup": round(med["off"] / med["on"], 2) if med["on"] else None,
                    "prompt_cache": stats,
                },
                indent=1,
            )
        )
    finally:
        on.close()
        off.close()


if __name__ == "__main__":
    main()
