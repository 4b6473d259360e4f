"""Sampling for the whole batch, and per-row processors for OpenAI's penalties and logit_bias.

Every row of a model's BatchGenerator holds the same BatchSampler, so mlx-lm samples the
batch in one call whatever the rows' temperatures, filters and seeds. A row gets a
processor only when it asks for one; plain rows carry none, so BatchGenerator keeps its
batched path for them (RUNTIME-NOTES.md, "what the workaround costs").
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.generate import GenerationBatch


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


@dataclass
class _Row:
    temp: float
    top_p: float
    top_k: int
    min_p: float
    key: mx.array | None  # this row's PRNG key, split once per step; None for greedy rows


_STEP_CODE = GenerationBatch._step.__code__
_GREEDY = _Row(0.0, 1.0, 0, 0.0, None)

# categorical over one row with its own key, vmapped over the batch: row i's draw is
# exactly what mx.random.categorical(logits_i, key=k_i) gives for the row alone, so it
# does not depend on the batch. (It is not make_sampler's draw, which sampled a [1, V]
# row: a seed gives another text than before this sampler, the same one alone or batched.)
_categorical = mx.vmap(lambda k, x: mx.random.categorical(x, key=k))
_split = mx.vmap(lambda k: mx.random.split(k))


# Temperatures below this are sampled greedily (see BatchSampler.add).
MIN_TEMPERATURE = 1e-6
# A repetition penalty below this is taken as this (see Engine's processors): mlx-lm
# divides the logits by it in their own dtype, so in float16 (max 65504) a smaller
# one made inf and NaN of ordinary logits (the final review of round 21: 1e-6).
MIN_REPETITION_PENALTY = 1e-2


class BatchSampler:
    """One sampler object for every row of a model's BatchGenerator, so the whole batch
    is sampled in one call (mlx-lm 0.32.2 samples in one call only when every row holds
    the same sampler object; otherwise each row alone, 2×B small kernels per step).

    Each row keeps its own temperature, top_p/top_k/min_p and PRNG key (split once per
    step, as make_sampler's per-row sampler does), so a seed decides a row's text
    whatever else is in the batch; greedy rows take the argmax. Rows are registered by
    their uid after insert and found by the uids of the batch being sampled: mlx-lm
    calls a sampler from GenerationBatch._step with logprobs of shape [B, V] whose
    rows are that batch's uids, in order.
    """

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self._rows: dict[int, _Row] = {}

    def add(self, uid: int, temp: float, top_p: float, top_k: int, min_p: float, seed: int) -> None:
        # A temperature this small samples the argmax anyway, and below ~3e-39 its
        # inverse overflows float32: every logit became inf or NaN and the row wrote
        # <pad> for ever, its grammar and logit_bias ignored (red team round 21).
        if temp < MIN_TEMPERATURE:
            self._rows[uid] = _GREEDY
        else:
            self._rows[uid] = _Row(float(temp), float(top_p), int(top_k), float(min_p), mx.random.key(seed))

    def discard(self, uid: int) -> None:
        self._rows.pop(uid, None)

    def __len__(self) -> int:
        return len(self._rows)

    @staticmethod
    def _batch_uids(n: int) -> list[int]:
        """The uids of the GenerationBatch whose _step called us (a few frames up)."""
        f = sys._getframe(2)
        for _ in range(4):
            if f is None:
                break
            if f.f_code is _STEP_CODE:
                uids = f.f_locals["self"].uids
                if len(uids) == n:
                    return uids
                break
            f = f.f_back
        raise RuntimeError("BatchSampler: called from outside mlx-lm's GenerationBatch._step")

    def __call__(self, logprobs: mx.array) -> mx.array:
        n = logprobs.shape[0]
        # A row nobody registers (its request is gone) is sampled greedily.
        rows = [self._rows.get(u, _GREEDY) for u in self._batch_uids(n)]
        sampled = [i for i, r in enumerate(rows) if r.key is not None]
        if not sampled:
            return mx.argmax(logprobs, axis=-1)
        if len(sampled) < n:
            # Greedy rows ride along with a dummy key; their draw is discarded.
            dummy = mx.random.key(0)
            keys = mx.stack([r.key if r.key is not None else dummy for r in rows])
        else:
            keys = mx.stack([r.key for r in rows])
        pairs = _split(keys)
        for i in sampled:
            rows[i].key = pairs[i, 0]
        x = self._filter(logprobs, rows)
        inv = mx.array([1.0 / r.temp if r.temp else 1.0 for r in rows], dtype=mx.float32)[:, None]
        drawn = _categorical(pairs[:, 1], x * inv)
        if len(sampled) == n:
            return drawn
        greedy = mx.array([r.key is None for r in rows])
        return mx.where(greedy, mx.argmax(logprobs, axis=-1), drawn)

    def _filter(self, x: mx.array, rows: list[_Row]) -> mx.array:
        """top_p, then min_p, then top_k (make_sampler's order), each with per-row
        parameters and only when some row asks for it; other rows pass unchanged."""
        v = x.shape[-1]
        if any(0 < r.top_p < 1.0 for r in rows):
            on = mx.array([0 < r.top_p < 1.0 for r in rows])[:, None]
            p = mx.array([r.top_p if 0 < r.top_p < 1.0 else 1.0 for r in rows], dtype=mx.float32)[:, None]
            # apply_top_p's arithmetic with a per-row p (apply_top_p itself is compiled
            # for a float p: an array would compile anew for every batch size).
            srt = mx.sort(x, axis=-1)
            probs = mx.exp(srt.astype(mx.float32))
            above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
            total = above[..., :1] + probs[..., :1]
            # At most v-1: a p that rounds to 0 in float32 (top_p below ~7e-46, which
            # the schema allows) dropped all v and read past the row: <pad> for ever
            # (red team round 21, second pass); it keeps the top token instead.
            dropped = mx.minimum((above >= p * total).sum(axis=-1, keepdims=True), v - 1)
            kept = mx.take_along_axis(srt, dropped, axis=-1)
            x = mx.where(on & (x < kept), -float("inf"), x)
        if any(r.min_p > 0 for r in rows):
            on = mx.array([r.min_p > 0 for r in rows])[:, None]
            logp = mx.array([math.log(r.min_p) if r.min_p > 0 else 0.0 for r in rows], dtype=mx.float32)
            floor = mx.max(x, axis=-1, keepdims=True) + logp[:, None]
            x = mx.where(on & (x < floor), -float("inf"), x)
        if any(0 < r.top_k < v for r in rows):
            on = mx.array([0 < r.top_k < v for r in rows])[:, None]
            k = mx.array([r.top_k - 1 if 0 < r.top_k < v else 0 for r in rows], dtype=mx.int32)[:, None]
            kth = mx.take_along_axis(-mx.sort(-x, axis=-1), k, axis=-1)
            x = mx.where(on & (x < kth), -float("inf"), x)
        return x


class RowGuard:
    """Runs one row's logits processor inside the batch step, where an exception would
    fail the whole step, so every row of the model, whoever sent it (and since
    batch_failed is retryable, again at each attempt: the review found one job with a
    presence_penalty on a model whose output outgrew its vocab_size dead-letter other
    tenants' jobs at their third attempt). An exception fails this row only: on_error
    records it (the engine ends the request generation_failed at its next token) and the
    logits pass unchanged, as JsonConstraint does for the grammar.
    """

    def __init__(
        self, proc: Callable[[mx.array, mx.array], mx.array], on_error: Callable[[str], None]
    ) -> None:
        self._proc = proc
        self._on_error = on_error
        self._failed = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._failed:
            return logits
        try:
            return self._proc(tokens, logits)
        except Exception as e:
            self._failed = True
            self._on_error(f"logits processor: {type(e).__name__}: {e}")
            return logits


class OpenAIPenalties:
    """logits += bias; logits -= frequency * count(t) + presence * [count(t) > 0].

    Counts are over the tokens generated in this completion, not the prompt (OpenAI's
    semantics, unlike mlx-lm's make_*_penalty, which look at the last 20 tokens of
    prompt and output alike). A migrated job's continuation was generated by an earlier
    attempt of the same completion, so its tokens are passed as ``prior`` and counted:
    the penalties then behave as if the job had never moved.

    BatchGenerator calls a processor with the row's token context (prompt, then one more
    token per step); the first call sees no generated token, and each later call sees
    exactly one new token at the end, which is added to the counts. Counting is O(1) per
    step.
    """

    def __init__(
        self,
        vocab: int,
        presence: float = 0.0,
        frequency: float = 0.0,
        bias: dict[int, float] | None = None,
        prior: list[int] | None = None,
    ) -> None:
        self.presence = float(presence)
        self.frequency = float(frequency)
        self.penalise = self.presence != 0.0 or self.frequency != 0.0
        self.bias_idx = self.bias_val = None
        if bias:
            self.bias_idx = mx.array(list(bias.keys()), dtype=mx.int32)
            self.bias_val = mx.array(list(bias.values()), dtype=mx.float32)
        self.counts = mx.zeros((vocab,), dtype=mx.float32)
        if prior:
            self.counts = self.counts.at[mx.array(prior, dtype=mx.int32)].add(1.0)
        self.started = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.penalise:
            if self.started:
                self.counts = self.counts.at[tokens[-1:]].add(1.0)
            self.started = True
            width = logits.shape[-1]
            if self.counts.shape[0] < width:
                # The model's output is wider than the vocabulary the runtime read (a
                # config that keeps vocab_size under text_config, padded embeddings):
                # the counts grow to it, or the subtraction below raised in every step.
                extra = mx.zeros((width - self.counts.shape[0],), dtype=mx.float32)
                self.counts = mx.concatenate([self.counts, extra])
            pen = self.frequency * self.counts + self.presence * (self.counts > 0)
            logits = logits - pen[:width].astype(logits.dtype)
        if self.bias_idx is not None:
            logits = logits.at[:, self.bias_idx].add(self.bias_val.astype(logits.dtype))
        return logits


_FLOOR = -9999.0  # JSON has no -inf; OpenAI reports -9999 for impossible tokens too


def _lp(x: float) -> float:
    return _FLOOR if not (x >= _FLOOR) else min(0.0, x)  # also maps NaN to the floor


def _tok(lltok, t: int) -> dict:
    b = lltok.decode_bytes([t])
    return {"token": b.decode("utf-8", errors="replace"), "bytes": list(b)}


def logprob_entry(lltok, token: int, logprobs: mx.array, top: int) -> dict:
    """OpenAI's chat logprobs entry for one sampled token.

    ``logprobs`` is the row's normalised distribution after processors (what was
    sampled from, so penalties and bias show). ``lltok`` is llguidance's tokenizer,
    which knows every token's raw bytes (byte-level BPE and SentencePiece alike).
    """
    row = logprobs.reshape(-1)
    if top > 0:
        idx = mx.argpartition(-row, kth=top - 1)[:top]
        vals = row[idx]
        order = mx.argsort(-vals)
        idx, vals = idx[order], vals[order]
        mx.eval(idx, vals)
        pairs = zip(idx.tolist(), vals.tolist(), strict=True)
        alts = [{**_tok(lltok, int(i)), "logprob": _lp(float(v))} for i, v in pairs]
    else:
        alts = []
    return {**_tok(lltok, token), "logprob": _lp(float(row[token].item())), "top_logprobs": alts}
