"""JSON-schema constrained decoding on llguidance with a numpy mask.

llguidance's own MLX helper applies masks with a Metal kernel, which does not exist on
MLX's CPU build, so the mask is unpacked with numpy and applied with mx.where.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy
import mlx.core as mx
import numpy as np

from .protocol import RpcError

_COMPILE_OPTIONS = {"whitespace_flexible": False}


class TokenizerCache:
    """One LLTokenizer per model, built on first use (about a second for big vocabularies)."""

    def __init__(self, hf_tokenizer: Any, n_vocab: int, eos_ids: list[int]) -> None:
        self._hf = hf_tokenizer
        self._n_vocab = n_vocab
        self._eos = eos_ids
        self._lock = threading.Lock()
        self._tok: llguidance.LLTokenizer | None = None

    def get(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tok is None:
                self._tok = llguidance.hf.from_tokenizer(
                    self._hf, n_vocab=self._n_vocab, eos_token=self._eos[0] if self._eos else None
                )
            return self._tok


def short_reason(err: str) -> str:
    """The first line of an llguidance error, bounded: the rest is the parser's state
    and the whole grammar, internals a client has no use for (and a large schema
    would make the error message as large)."""
    line = err.strip().split("\n", 1)[0].strip()
    return (line[:197] + "...") if len(line) > 200 else (line or "rejected")


def compile_schema(cache: TokenizerCache, schema: dict[str, Any]) -> str:
    """Turn a JSON schema into an llguidance grammar, or raise invalid_schema."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_COMPILE_OPTIONS)
    except (ValueError, TypeError) as e:
        raise RpcError("invalid_schema", f"json_schema: {short_reason(str(e))}") from e
    tok = cache.get()
    err = llguidance.LLMatcher.validate_grammar(grammar, tok)
    if err and not err.startswith("WARNING"):
        raise RpcError("invalid_schema", f"json_schema: {short_reason(err)}")
    # A schema can compile and still admit no value at all ({"$ref": "#"}, or
    # allOf of itself: a rule with no way out). llguidance finds that only when it
    # computes the first mask, which during generation failed the job as
    # generation_failed, a server error, with the parser's state as the message.
    # The first mask is microseconds: computed here, the request is refused as
    # the client's fault before it is queued for generation.
    probe = llguidance.LLMatcher(tok, grammar, log_level=0)
    mask = llguidance.numpy.allocate_token_bitmask(1, tok.vocab_size)
    llguidance.numpy.fill_next_token_bitmask(probe, mask, 0)
    if probe.is_error():
        raise RpcError("invalid_schema", "json_schema: no JSON value satisfies the schema")
    return grammar


class JsonConstraint:
    """A per-request mlx-lm logits processor that only allows tokens the grammar accepts.

    mlx-lm calls it with the whole token context (prompt, then prompt plus generated
    tokens); every call after the first has exactly the tokens sampled since the last.
    Decoding is pipelined, so it is called once more after EOS: that call is a no-op.
    """

    def __init__(
        self,
        cache: TokenizerCache,
        grammar: str,
        eos_ids: list[int],
        prefix_tokens: list[int],
        on_error: Callable[[str], None],
    ) -> None:
        self._matcher = llguidance.LLMatcher(cache.get(), grammar, log_level=0)
        self._eos = set(eos_ids)
        self._seen: int | None = None
        self._done = False
        self._on_error = on_error
        self._bitmask = llguidance.numpy.allocate_token_bitmask(1, cache.get().vocab_size)
        if prefix_tokens and not self._matcher.consume_tokens(prefix_tokens):
            raise RpcError(
                "invalid_params",
                "continuation does not match json_schema",
                violations=[{"path": "$.continuation", "reason": "does not match json_schema"}],
            )

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        # Called inside the batch step of every row of the model: an exception here
        # would fail the whole step, so every row of the model, whoever sent it. It
        # fails this request only (on_error), and the row decodes unconstrained until
        # the engine ends it.
        if self._done:
            return logits
        try:
            return self._constrain(tokens, logits)
        except Exception as e:
            self._done = True
            self._on_error(f"{type(e).__name__}: {e}")
            return logits

    def _constrain(self, tokens: mx.array, logits: mx.array) -> mx.array:
        n = tokens.shape[0]
        if self._seen is None:
            self._seen = n
        elif not self._done:
            new = tokens[self._seen : n].tolist()
            self._seen = n
            for t in new:
                if t in self._eos:
                    self._done = True
                    break
                if not self._matcher.consume_token(t):
                    self._done = True
                    self._on_error(short_reason(self._matcher.get_error() or "token rejected by grammar"))
                    break
        if self._done:
            return logits
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        if self._matcher.is_error():
            self._done = True
            self._on_error(short_reason(self._matcher.get_error()))
            return logits
        v = logits.shape[-1]
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[:v]
        if bits.shape[0] < v:
            bits = np.concatenate([bits, np.zeros(v - bits.shape[0], dtype=np.uint8)])
        allowed = mx.array(bits.astype(np.bool_))
        return mx.where(allowed, logits, mx.array(-float("inf"), dtype=logits.dtype))
