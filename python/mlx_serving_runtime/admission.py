"""When new requests join a model's running batch, and counting the prefill passes they cost.

Why hold an arrival at all: mlx-lm 0.32.2's BatchGenerator.next() decodes one step, then
prefills every prompt inserted since the last call in one forward pass (their prompts but
the last token), and on the call after moves them to decoding with one more forward pass
over the new rows alone plus a copy of every row's KV cache (BatchKVCache.extend). Those
passes cost about the same for one new row as for twenty, and the rows already decoding
wait through them. In a closed loop a finished row's answer goes over the pipe to the
client, which sends the next request back; replacements arrive spread over a few ms, so
without holding, the engine admits them in many small groups (measured on the CPU tiny
model at concurrency 32: 20-26 admission passes of 1-31 rows for 168 rows, where mlx-lm
driven in-process, replacing finished rows synchronously, needs 13: 8 warm-up rows alone
and 5 passes of 32).

The rule (admit_now): an arrival is admitted at once when nothing is decoding (an idle
engine never delays a request: TTFT at concurrency 1 is unchanged) or when the pending
arrivals are as many as the rows that ended in the last max_wait_s and were not replaced
yet (``expected``: the replacements a closed loop is sending) or fill every free row;
otherwise it is held until the oldest pending one has waited max_wait_s, then all pending
are admitted together (FIFO, so nobody starves: the wait of every arrival is bounded by
max_wait_s plus one decode step, the loop's tick). With no row ended recently nothing is
expected and an arrival goes in at once: holding for a fill alone cost a closed loop at
8 of 32 rows ~23 ms of TTFT per request (BENCHMARKS.md). max_wait_s = 0 turns holding off.

The bound: ``--admit-wait-ms`` of the runtime, default ``$MLX_SERVING_ADMIT_WAIT_MS``,
else DEFAULT_WAIT_MS.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, deque
from typing import Any

ENV = "MLX_SERVING_ADMIT_WAIT_MS"
# Long enough for a closed loop's replacements to come back over the pipe: on the CPU
# tiny model 31 of them arrive spread over 6-12 ms (the reader parses and tokenizes each),
# so 10 ms still split them (18-22 admissions for 168 rows) where 25 ms did not (18: one
# lone row per round, admitted at once on an idle engine, and 31 together; BENCHMARKS.md).
# The price: at a partial load (fewer arrivals than free rows) a request that comes
# while others decode waits up to this long, plus one step, for its first token.
DEFAULT_WAIT_MS = 25.0
STATS_ENV = "MLX_SERVING_PASS_STATS"  # a file: the process appends its PassCounter at exit


def resolve_wait_ms(value: float | None) -> float:
    """The hold bound in ms: value, else $MLX_SERVING_ADMIT_WAIT_MS, else DEFAULT_WAIT_MS."""
    if value is None:
        env = os.environ.get(ENV)
        value = float(env) if env else DEFAULT_WAIT_MS
    if not value >= 0:  # also NaN
        raise ValueError(f"admission wait {value!r} ms must be >= 0")
    return float(value)


def admit_now(
    pending: int, oldest_wait_s: float, decoding: int, max_batch: int, max_wait_s: float, expected: int
) -> bool:
    """Whether the pending arrivals join the batch now (all of them, oldest first).

    pending: arrivals held; oldest_wait_s: how long the oldest has waited; decoding: rows
    the generators hold (decoding or being prefilled); max_batch: rows a batch takes;
    expected: rows that ended in the last max_wait_s, less the arrivals admitted since.
    """
    if pending <= 0:
        return False
    if decoding <= 0:
        return True  # idle: nothing to group with, never delay
    if pending >= min(max_batch - decoding, expected):
        return True  # every awaited replacement is here, or the batch is full
    return oldest_wait_s >= max_wait_s


class Expected:
    """Rows that ended recently and are not replaced yet: when each ended, oldest first."""

    def __init__(self) -> None:
        self._ends: deque[float] = deque()

    def ended(self, n: int, now: float) -> None:
        self._ends.extend([now] * n)

    def admitted(self, n: int) -> None:
        for _ in range(min(n, len(self._ends))):
            self._ends.popleft()

    def count(self, now: float, window_s: float) -> int:
        while self._ends and now - self._ends[0] > window_s:
            self._ends.popleft()
        return len(self._ends)


class PassCounter:
    """How many prefill passes a BatchGenerator ran, and how many prompts each took.

    mlx-lm 0.32.2's BatchGenerator.next() returns one PromptProcessingBatch.Response per
    prompt it prefilled in that call (end_of_prompt False: one forward pass over them all)
    and one per row it moved to decoding (end_of_prompt True: one more one-token forward
    pass over the new rows, then their KV caches are concatenated onto the batch's).
    """

    def __init__(self) -> None:
        self.prefill: Counter[int] = Counter()  # prompts in the pass -> passes
        self.join: Counter[int] = Counter()  # rows joining decode at once -> times
        self.steps = 0  # next() calls that decoded
        self.rows = 0  # rows decoded, over those steps
        self.next_s = 0.0  # seconds inside next()
        self.idle_s = 0.0  # seconds the loop waited for work (the runtime only)
        self.t0 = time.perf_counter()

    def step(self, prompt_responses: list[Any], decoded: int, seconds: float) -> None:
        if prompt_responses:
            joined = sum(1 for r in prompt_responses if r.end_of_prompt)
            filled = len(prompt_responses) - joined
            if filled:
                self.prefill[filled] += 1
            if joined:
                self.join[joined] += 1
        if decoded:
            self.steps += 1
            self.rows += decoded
        self.next_s += seconds

    def summary(self) -> dict[str, Any]:
        def one(c: Counter[int]) -> dict[str, Any]:
            n = sum(c.values())
            rows = sum(k * v for k, v in c.items())
            mean = round(rows / n, 2) if n else 0.0
            return {"passes": n, "rows": rows, "mean": mean, "sizes": dict(sorted(c.items()))}

        return {
            "prefill": one(self.prefill),
            "join": one(self.join),
            "steps": self.steps,
            "rows_per_step": round(self.rows / self.steps, 2) if self.steps else 0.0,
            "next_s": round(self.next_s, 3),
            "idle_s": round(self.idle_s, 3),
            "wall_s": round(time.perf_counter() - self.t0, 3),
        }

    def dump_to_env(self, label: str = "runtime") -> None:
        """Append the summary to $MLX_SERVING_PASS_STATS, when set (benches read it)."""
        path = os.environ.get(STATS_ENV)
        if not path:
            return
        with open(path, "a") as f:
            f.write(json.dumps({"label": label, "t": time.time(), **self.summary()}) + "\n")
