"""How long the runtime takes to answer health behind eight large valid generates.

Each generate carries 256 messages, 255 of them with 50 tool calls (~1 MB, valid under
the schemas; red team round 16, F1). The worker restarts a runtime whose health goes
unanswered for 5 s. Usage:

    python python/bench/health_probe.py PYTHONPATH MODEL_DIR

PYTHONPATH is the python/ directory of the runtime to probe (so two checkouts can be
compared); MODEL_DIR a model directory (the tiny model: .cache/tiny-model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any


def main() -> None:
    env = dict(os.environ, PYTHONPATH=sys.argv[1])
    p = subprocess.Popen(
        [sys.executable, "-m", "mlx_serving_runtime", "--max-batch", "8"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert p.stdin is not None and p.stdout is not None
    answers: dict[Any, tuple[float, dict]] = {}
    cond = threading.Condition()

    def reader() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            m = json.loads(line)
            if "id" in m:
                with cond:
                    answers[m["id"]] = (time.monotonic(), m)
                    cond.notify_all()

    def send(m: dict) -> None:
        assert p.stdin is not None
        p.stdin.write((json.dumps(m) + "\n").encode())
        p.stdin.flush()

    def wait(i: Any, timeout: float = 120) -> tuple[float, dict] | None:
        with cond:
            cond.wait_for(lambda: i in answers, timeout)
            return answers.get(i)

    threading.Thread(target=reader, daemon=True).start()
    send({"jsonrpc": "2.0", "id": 1, "method": "model.load", "params": {"model": sys.argv[2], "id": "tiny"}})
    wait(1)
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    calls = [{"id": f"c{k}", **call} for k in range(50)]
    msgs = [{"role": "user", "content": "hi"}]
    msgs += [{"role": "assistant", "content": "", "tool_calls": calls} for _ in range(255)]
    t0 = time.monotonic()
    for k in range(8):
        params = {"model": "tiny", "messages": msgs, "max_tokens": 1, "request_id": f"r{k}"}
        send({"jsonrpc": "2.0", "id": 100 + k, "method": "generate", "params": params})
    send({"jsonrpc": "2.0", "id": 2, "method": "health"})
    a = wait(2)
    print(f"health answered after {a[0] - t0:.2f} s" if a else "no health answer")
    ends = [wait(100 + k) for k in range(8)]
    print("generates answered after", [round(e[0] - t0, 1) for e in ends if e], "s")
    p.stdin.close()
    p.kill()


if __name__ == "__main__":
    main()
