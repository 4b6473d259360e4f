"""What the engine sends for a request: its chunks as text becomes final (stop strings held
back until they can no longer start one), and its one answer at the end (the response with
text, usage and timings, or an error). A mixin of Engine, run on the generation thread only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .protocol import RpcError, error_response, notification, response

if TYPE_CHECKING:
    from .models import Model
    from .request import Request


# What the worker keeps of a result's logprobs (worker/logprobs.go: maxResultLogprobs,
# maxResultLogprobsBytes and logprobSize, the result schema's maxItems): the result line
# carries no more. It carried every entry, ~1.3 KB a token with 20 top logprobs, so a long
# job's line passed the worker's 16 MiB line limit; the worker then took the runtime for
# broken and restarted it, and every job beside it lost an attempt, on each of the long
# job's attempts (red team round 19, runtime F1). The chunks still carry every entry.
RESULT_LOGPROBS = 4096
RESULT_LOGPROBS_BYTES = 256 << 10


def _logprob_size(token: str, nbytes: int) -> int:
    """logprobSize's over-estimate of one entry's JSON (token length in UTF-8 bytes)."""
    return 6 * len(token.encode("utf-8", "surrogatepass")) + 4 * nbytes + 24 + 48


def bound_logprobs(entries: list[dict]) -> tuple[list[dict], bool]:
    """The leading entries within the worker's bounds, and whether any were cut."""
    size = 0
    for i, e in enumerate(entries):
        size += _logprob_size(e["token"], len(e["bytes"]))
        for t in e["top_logprobs"]:
            size += _logprob_size(t["token"], len(t["bytes"]))
        if i >= RESULT_LOGPROBS or size > RESULT_LOGPROBS_BYTES:
            return entries[:i], True
    return entries, False


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class OutputMixin:
    """Engine's output side; it uses Engine's _by_uid, _lock, _models, _inflight, _reused,
    _out and _keep_cache."""

    def _match_stop(self, m: Model, req: Request, finish: str | None) -> bool:
        if not req.stop:
            return False
        full = req.continuation + req.out
        best = -1
        for s in req.stop:
            start = max(0, len(req.continuation) + req.sent - len(s) + 1)
            i = full.find(s, start)
            if i >= 0 and (best < 0 or i < best):
                best = i
        if best < 0:
            return False
        self._emit(req, max(0, best - len(req.continuation)))
        req.lp_pending.clear()  # tokens of the stop string and after: not part of the answer
        if finish is None:
            # The row is removed before the batch finishes it: take its cache on the way out.
            kept = m.gen.remove([req.uid], return_prompt_caches=self.prompt_cache.enabled)
            if req.uid in kept:
                cache, tokens = kept[req.uid]
                self._keep_cache(m, req.cache_scope, tokens, cache)
        self._end(req, "stop")
        return True

    def _emit(self, req: Request, upto: int) -> None:
        if upto <= req.sent:
            return
        text = req.out[req.sent : upto]
        req.sent = upto
        chunk = {"request_id": req.request_id, "seq": req.seq, "text": text, "tokens": req.completion_tokens}
        if req.logprobs is not None:
            # A token goes with the chunk that carries the first character it added;
            # one that added none yet (held-back bytes) waits for the text it brings.
            n = 0
            while n < len(req.lp_pending) and req.lp_pending[n][0] < upto:
                n += 1
            lps = [e for _, e in req.lp_pending[:n]]
            del req.lp_pending[:n]
            req.lp_sent += lps
            if lps:
                chunk["logprobs"] = lps
        self._out(notification("generate.chunk", chunk))
        req.seq += 1

    def _end(self, req: Request, reason: str) -> None:
        self._by_uid.pop((req.model_id, req.uid), None)
        self._forget_row(req)
        if reason == "cancelled":
            with self._lock:
                m = self._models.get(req.model_id)
            if m is not None and m.gen is not None and req.uid >= 0:
                m.gen.remove([req.uid])
        now = time.perf_counter()
        total = now - req.accepted
        first = req.first_token_at or now
        decode = now - first
        if req.completion_tokens > 1 and decode > 0:
            tps = (req.completion_tokens - 1) / decode
        else:
            tps = req.completion_tokens / total if total > 0 else 0.0
        # The rendered prompt only: a continuation (a migrated job's text so
        # far) is fed as prompt but was generated, and counted, by the earlier
        # attempt.
        prompt = req.prefix_len
        # Of the rendered prompt only, like prompt_tokens.
        cached = min(self._reused.pop(req.request_id, 0), prompt)
        with self._lock:
            self._inflight.pop(req.request_id, None)
        extra = {}
        if req.logprobs is not None:
            # Tokens that never added a character (the very end) are kept; those
            # past a stop string were dropped with their text (_match_stop).
            req.lp_sent += [e for _, e in req.lp_pending]
            extra["logprobs"], cut = bound_logprobs(req.lp_sent)
            if cut:
                extra["logprobs_truncated"] = True
        self._out(
            response(
                req.rpc_id,
                {
                    **extra,
                    "request_id": req.request_id,
                    "finish_reason": reason,
                    "text": req.out[: req.sent],
                    "usage": {
                        "prompt_tokens": prompt,
                        "completion_tokens": req.completion_tokens,
                        "total_tokens": prompt + req.completion_tokens,
                        "cached_tokens": cached,
                    },
                    "timings": {
                        "ttft_ms": round((first - req.accepted) * 1000, 3),
                        "total_ms": round(total * 1000, 3),
                        "tokens_per_s": round(tps, 3),
                    },
                },
            )
        )

    def _forget_row(self, req: Request) -> None:
        if req.uid < 0:
            return
        with self._lock:
            m = self._models.get(req.model_id)
        if m is not None and m.sampler is not None:
            m.sampler.discard(req.uid)

    def _fail(self, req: Request, err: RpcError) -> None:
        self._reused.pop(req.request_id, None)
        self._forget_row(req)
        with self._lock:
            self._inflight.pop(req.request_id, None)
        err.data.setdefault("request_id", req.request_id)
        self._out(error_response(req.rpc_id, err))
