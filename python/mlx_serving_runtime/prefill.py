"""How prompts are prefilled on the GPU: the runtime's one switch for it, and prefill buckets.

Why it matters: on MLX's CUDA backend a prefill's attention (query length > 1) runs
cuDNN's fused SDPA (``mlx/backend/cuda/scaled_dot_product_attention.cpp``
``supports_sdpa_cudnn``: fp16/bf16, head dim a multiple of 8 up to 128, an array mask
or causal), and MLX builds a cuDNN frontend graph per ``SDPACacheKey``: batch, query
length, key length and the strides of q, k, v and the mask (so also the KV buffer's
capacity). Building one costs far more than the prefill: on an H200 (1b preset, 1,088
tokens) 33 ms to the first token for a length seen before, 92-880 ms for a new one, and
in chat every turn has a new length. Decoding never uses cuDNN here (BatchGenerator
always passes an array mask, and MLX's own vector kernel and cuDNN decode both refuse
one), so the unfused matmul + softmax already serves every decode step.

The modes (``--prefill-mode``, env ``MLX_SERVING_PREFILL_MODE``; DEFAULT_MODE below):

- ``plain``: mlx-lm as it is.
- ``unfused``: ``MLX_CUDA_USE_CUDNN_SDPA=0`` for this process, so prefill attention is
  MLX's unfused matmul + softmax too: no per-shape graph, no padding. Its cost is the
  [batch, heads, query, key] score matrix per layer (prefill runs in chunks of at most
  2,048 queries), which cuDNN's flash attention never materialises.
- ``buckets``: cuDNN kept, shapes made few: each prefill pass pads its rows to
  ``bucket(longest)`` and the cached history to a multiple of ``HISTORY_QUANTUM``. The
  first prompt of each new (batch, bucket, history) still builds its graph.
- ``auto`` (the default): ``unfused`` where MLX runs on a CUDA GPU and nobody set
  MLX_CUDA_USE_CUDNN_SDPA, else ``plain``. Measured (BENCHMARKS.md, H200, 1b preset):
  unfused 42 ms to a new length's first token, buckets 40 ms (133-310 ms for a new
  bucket), plain 92-880 ms; the CPU backend has no per-shape build (Metal: not measured).

Why padding is exact: mlx-lm's ``PromptProcessingBatch.prompt`` already right-pads a
batch's rows to its longest row and, after the forward pass, rolls the padding to the
left of each row's KV cache, where ``BatchKVCache``'s left-padding mask hides it. Buckets
only pad further. Padding tokens come after every real token of their row and the mask
is causal, so no real token attends to them; history padding is masked like mlx-lm's own
left padding; RoPE positions come from each row's offset, which padding leaves alone.
tests/test_prefill.py checks logprobs and texts against the plain path.
"""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, PromptProcessingBatch, _right_pad_prompts
from mlx_lm.models.cache import BatchKVCache

MODES = ("auto", "plain", "unfused", "buckets")
ENV = "MLX_SERVING_PREFILL_MODE"
DEFAULT_MODE = "auto"
CUDNN_ENV = "MLX_CUDA_USE_CUDNN_SDPA"  # read by MLX once, at the first attention call
PER_OCTAVE = 4  # bucket lengths per doubling: at most 25% padding
# Below this every prompt pads to it: on a GPU a 256-token prefill costs about what a
# 20-token one does, and one query length for every short chat turn means few graphs.
MIN_BUCKET = 256
HISTORY_QUANTUM = 256  # mlx-lm's KV cache step: aligned history keeps buffer strides aligned too


def bucket(n: int) -> int:
    """The smallest bucket length >= n: MIN_BUCKET, then PER_OCTAVE steps per doubling."""
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    # n >> shift lies in [PER_OCTAVE, 2 * PER_OCTAVE): round up to a multiple of 1 << shift.
    shift = max(0, n.bit_length() - PER_OCTAVE.bit_length())
    step = 1 << shift
    return -(-n // step) * step


def align_history(n: int) -> int:
    return -(-n // HISTORY_QUANTUM) * HISTORY_QUANTUM


def on_cuda() -> bool:
    try:
        return mx.default_device() == mx.gpu and mx.cuda.is_available()
    except AttributeError:  # an MLX without the cuda module
        return False


def resolve(mode: str | None) -> str:
    """The concrete mode (plain, unfused or buckets) for mode (None: the env, else DEFAULT_MODE)."""
    mode = (mode or os.environ.get(ENV) or DEFAULT_MODE).lower()
    if mode not in MODES:
        raise ValueError(f"prefill mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "auto":
        return "unfused" if on_cuda() and CUDNN_ENV not in os.environ else "plain"
    return mode


def apply(mode: str) -> None:
    """Set up the process for mode; before the first forward pass (MLX reads CUDNN_ENV once)."""
    if mode == "unfused":
        os.environ[CUDNN_ENV] = "0"


def _pad_history(c: BatchKVCache, to: int) -> None:
    """Left-pad a batch cache's history to `to` positions; the mask hides the padding."""
    extra = to - c._idx
    if extra <= 0 or c.keys is None:
        return
    pad = [(0, 0), (0, 0), (extra, 0), (0, 0)]
    c.keys = mx.pad(c.keys[..., : c._idx, :], pad)
    c.values = mx.pad(c.values[..., : c._idx, :], pad)
    c.left_padding = c.left_padding + extra
    c._idx = to
    # offset (each row's real length, RoPE's position) is unchanged.


class BucketedPromptBatch(PromptProcessingBatch):
    """mlx-lm's prompt batch, padding each forward pass to bucketed shapes.

    prompt() is mlx-lm 0.32.2's own (the pinned version) with a wider pad and aligned
    history. An mlx-lm that changes how prompt() pads or finalizes caches must be read
    again before the pin moves: tests/test_prefill.py compares logprobs with its path.
    """

    def prompt(self, tokens: list[list[int]]) -> None:
        if len(self.uids) != len(tokens):
            raise ValueError("The batch length doesn't match the number of inputs")
        if not tokens:
            return
        plain = not all(type(c) is BatchKVCache for c in self.prompt_cache)
        if plain:  # rotating or other caches: mlx-lm's own path, unpadded
            return super().prompt(tokens)
        for sti, ti in zip(self.tokens, tokens, strict=True):
            sti += ti
        lengths = [len(p) for p in tokens]
        width = bucket(max(lengths))
        padding = [width - n for n in lengths]
        idx = self.prompt_cache[0]._idx
        if idx and idx % HISTORY_QUANTUM:
            for c in self.prompt_cache:
                _pad_history(c, align_history(idx))
        for c in self.prompt_cache:
            c.prepare(lengths=lengths, right_padding=padding)
        arr = _right_pad_prompts(tokens, max_length=width)
        while arr.shape[1] > 0:
            n = min(self.prefill_step_size, arr.shape[1])
            self.model(arr[:, :n], cache=self.prompt_cache)
            mx.eval([c.state for c in self.prompt_cache])
            arr = arr[:, n:]
        for c in self.prompt_cache:
            c.finalize()
        mx.eval([c.state for c in self.prompt_cache])
        mx.clear_cache()


class BucketedBatchGenerator(BatchGenerator):
    """A BatchGenerator whose prompt batches pad to bucketed shapes (see the module doc)."""

    def __init__(self, model: Any, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._prompt_batch = BucketedPromptBatch.empty(
            self.model, self.sampler, prefill_step_size=self.prefill_step_size
        )

    def _make_batch(self, n: int) -> PromptProcessingBatch:
        b = super()._make_batch(n)
        b.__class__ = BucketedPromptBatch  # same fields; only prompt() differs
        return b


def new_generator(model: Any, mode: str, **kwargs: Any) -> BatchGenerator:
    """mlx-lm's BatchGenerator for mode (resolved): bucketed prefill for "buckets"."""
    cls = BucketedBatchGenerator if mode == "buckets" else BatchGenerator
    return cls(model, **kwargs)
