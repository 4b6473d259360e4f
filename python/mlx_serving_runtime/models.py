"""Models on the generation thread: loading, the BatchGenerator each one gets,
unloading, and what the machine's memory allows.

ModelsMixin holds the Engine's model-lifecycle commands (model.load,
model.unload); it runs on the generation thread like every Engine method, and
reads the Engine's state (its lock, models, caps and stream).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm import load as mlx_load
from mlx_lm.generate import BatchGenerator

from . import prefill, sampling, structured
from .protocol import RpcError, error_response, response

log = logging.getLogger("mlx_serving_runtime")

_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions", "n_ctx")


@dataclass
class Model:
    id: str
    path: str
    model: Any
    tokenizer: Any  # mlx_lm TokenizerWrapper
    context_length: int
    vocab_size: int
    eos_ids: list[int]
    grammar_tokenizer: structured.TokenizerCache
    gen: BatchGenerator | None = None
    sampler: sampling.BatchSampler | None = None  # every row of gen, sampled in one call


def vocab_size(config: dict, tokenizer_len: int) -> int:
    """The model's vocabulary: config's vocab_size, else text_config's (multimodal families
    such as Gemma 3 and Qwen-VL keep it there), else the tokenizer's length, which can be
    narrower than the model's output (OpenAIPenalties and JsonConstraint size themselves
    to the logits either way)."""
    text = config.get("text_config") or {}
    return int(config.get("vocab_size") or text.get("vocab_size") or tokenizer_len)


def context_length(config: dict[str, Any], tokenizer: Any) -> int:
    for k in _CONTEXT_KEYS:
        v = config.get(k)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 10_000_000:
        return v
    return 4096


def is_oom(e: BaseException) -> bool:
    m = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in m or "allocat" in m


def memory_limit() -> int:
    """What MLX may allocate: Metal's recommended working set, else MLX's own limit."""
    try:
        v = int(mx.device_info().get("max_recommended_working_set_size", 0))
    except Exception:
        v = 0
    if not v:
        try:
            v = int(mx.get_memory_limit())
        except Exception:
            v = 0
    return v


def memory_info() -> dict[str, int]:
    total = 0
    try:
        total = int(mx.device_info().get("memory_size", 0))
    except Exception:
        total = 0
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = 0
    return {"total_bytes": total, "active_bytes": mx.get_active_memory(), "peak_bytes": mx.get_peak_memory()}


class ModelsMixin:
    """model.load and model.unload, for Engine."""

    def _load(self, rpc_id: Any, params: dict[str, Any]) -> None:
        ref = params["model"]
        mid = params.get("id") or ref
        with self._lock:
            existing = self._models.get(mid)
            count = len(self._models)
        if existing is not None:
            if existing.path != str(Path(ref).resolve()) and existing.path != ref:
                raise_err = RpcError(
                    "model_load_failed", f"id {mid!r} is already loaded from {existing.path}", model=ref
                )
                self.send(error_response(rpc_id, raise_err))
                return
            self.send(response(rpc_id, self._load_result(existing, 0.0)))
            return
        if count >= self.max_models:
            self.send(
                error_response(
                    rpc_id,
                    RpcError(
                        "too_many_models", f"{count} models loaded, the cap is {self.max_models}", model=ref
                    ),
                )
            )
            return
        t0 = time.perf_counter()
        try:
            model, tokenizer, config = mlx_load(ref, return_config=True)
        except Exception as e:
            code = "out_of_memory" if is_oom(e) else "model_load_failed"
            log.warning("load %s failed: %s", ref, e)
            self.send(
                error_response(
                    rpc_id, RpcError(code, f"cannot load {ref!r}: {type(e).__name__}: {e}", model=ref)
                )
            )
            return
        path = str(Path(ref).resolve()) if Path(ref).exists() else ref
        vocab = vocab_size(config, len(tokenizer._tokenizer))
        eos = sorted(int(t) for t in (tokenizer.eos_token_ids or []))
        m = Model(
            id=mid,
            path=path,
            model=model,
            tokenizer=tokenizer,
            context_length=context_length(config, tokenizer._tokenizer),
            vocab_size=vocab,
            eos_ids=eos,
            grammar_tokenizer=structured.TokenizerCache(tokenizer._tokenizer, vocab, eos),
        )
        m.gen = self._new_generator(m)
        with self._lock:
            self._models[mid] = m
        self.send(response(rpc_id, self._load_result(m, (time.perf_counter() - t0) * 1000)))

    def _new_generator(self, m: Model) -> BatchGenerator:
        # One sampler object for every row (uids restart with a new generator).
        m.sampler = sampling.BatchSampler(m.vocab_size)
        # EOS ends a row only when listed here: BatchGenerator does not stop on it by default.
        return prefill.new_generator(
            m.model,
            self.prefill_mode,
            stop_tokens=[[t] for t in m.eos_ids],
            completion_batch_size=self.max_batch,
            prefill_batch_size=self.max_batch,
            stream=self._stream,
        )

    @staticmethod
    def _load_result(m: Model, ms: float) -> dict[str, Any]:
        return {
            "id": m.id,
            "path": m.path,
            "context_length": m.context_length,
            "vocab_size": m.vocab_size,
            "load_time_ms": round(ms, 3),
        }

    def _unload(self, rpc_id: Any, mid: str) -> None:
        with self._lock:
            m = self._models.get(mid)
        if m is None:
            self.send(
                error_response(
                    rpc_id, RpcError("model_not_loaded", f"model {mid!r} is not loaded", model=mid)
                )
            )
            return
        for key, req in list(self._by_uid.items()):
            if key[0] == mid:
                self._end(req, "cancelled")
        with self._lock:
            del self._models[mid]
        if m.gen is not None:
            m.gen.close()
        self.prompt_cache.drop_model(mid)
        mx.clear_cache()
        self.send(response(rpc_id, {"id": mid, "unloaded": True}))
