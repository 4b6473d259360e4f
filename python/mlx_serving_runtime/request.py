"""A generate request: checked and tokenized on the preparer thread (preparer.py), its
grammar compiled on a compile thread (compiler.py), run by the engine."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import structured, tools
from .protocol import RpcError
from .validation import default_max_tokens

if TYPE_CHECKING:
    from .engine import Engine


@dataclass
class Request:
    rpc_id: Any
    request_id: str
    model_id: str
    prompt_tokens: list[int]
    prefix_len: int  # tokens of the rendered prompt (prompt_tokens minus continuation)
    continuation: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float | None
    presence_penalty: float
    frequency_penalty: float
    logit_bias: dict[int, float]
    logprobs: int | None  # None: not asked; n: each token's logprob and n alternatives
    seed: int
    stop: list[str]
    grammar: str | None
    # Set by request_from_params when the request has a grammar to compile; run off
    # the reader thread (compiler.py) or by Engine.submit_generate, then cleared.
    compile_grammar: Callable[[], str | None] | None = None
    cache_scope: str = ""  # prompt-cache entries are shared only within a scope (the tenant)
    accepted: float = field(default_factory=time.perf_counter)
    # Filled on the generation thread.
    uid: int = -1
    detok: Any = None
    out: str = ""  # generated text decoded so far
    sent: int = 0  # chars of out already emitted
    seq: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    error: str | None = None
    lp_pending: list[tuple[int, dict]] = field(default_factory=list)  # (start in out, entry)
    lp_sent: list[dict] = field(default_factory=list)


def request_from_params(engine: Engine, rpc_id: Any, p: dict[str, Any]) -> Request:
    """Tokenize and check a generate, so the engine only runs it: on the preparer
    thread (preparer.py), off the reader, since a long prompt takes seconds."""
    m = engine.model(p["model"])
    tok = m.tokenizer
    if "messages" in p:
        if not getattr(tok, "chat_template", None):
            raise RpcError(
                "invalid_params",
                f"model {m.id!r} has no chat template",
                violations=[{"path": "$.messages", "reason": "model has no chat template"}],
            )
        # HF templates take OpenAI's tool list as is; with a template that ignores it
        # the model is not told about the tools, but the grammar below still forces calls.
        extra = {"tools": p["tools"]} if p.get("tools") else {}
        messages = tools.template_messages(p["messages"])
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        prompt = tok.encode(text, add_special_tokens=False)
    else:
        text = p["prompt"]
        bos = getattr(tok, "bos_token", None)
        prompt = tok.encode(text, add_special_tokens=not (bos and text.startswith(bos)))
    prefix_len = len(prompt)
    cont = p.get("continuation", "")
    if cont:
        prompt = prompt + tok.encode(cont, add_special_tokens=False)
    if not prompt:
        raise RpcError(
            "invalid_params",
            "the prompt renders to no tokens",
            violations=[{"path": "$.prompt", "reason": "renders to no tokens"}],
        )
    if len(prompt) >= m.context_length:
        raise RpcError(
            "context_exceeded",
            f"prompt has {len(prompt)} tokens, the context of {m.id!r} is {m.context_length}",
            prompt_tokens=len(prompt),
            context_length=m.context_length,
        )
    compile_grammar = grammar_compile(m, p)
    bias: dict[int, float] = {}
    for k, v in (p.get("logit_bias") or {}).items():
        if int(k) >= m.vocab_size:
            raise RpcError(
                "invalid_params",
                f"logit_bias token {k} is outside the vocabulary of {m.id!r} ({m.vocab_size})",
                violations=[{"path": f"$.logit_bias[{k}]", "reason": "token id outside the vocabulary"}],
            )
        bias[int(k)] = float(v)
    seed = p.get("seed")
    if seed is None:
        seed = random.SystemRandom().randrange(2**63)
    return Request(
        rpc_id=rpc_id,
        request_id=p["request_id"],
        model_id=m.id,
        cache_scope=p.get("cache_scope", ""),
        prompt_tokens=prompt,
        prefix_len=prefix_len,
        continuation=cont,
        # Absent: until a stop, EOS or the context's end, at most the schema's default.
        # Generation ends at the context: a longer max_tokens finishes with "length" there.
        max_tokens=min(int(p.get("max_tokens", default_max_tokens())), m.context_length - len(prompt)),
        temperature=float(p.get("temperature", 0.0)),
        top_p=float(p.get("top_p", 1.0)),
        top_k=int(p.get("top_k", 0)),
        min_p=float(p.get("min_p", 0.0)),
        repetition_penalty=p.get("repetition_penalty"),
        presence_penalty=float(p.get("presence_penalty", 0.0)),
        frequency_penalty=float(p.get("frequency_penalty", 0.0)),
        logit_bias=bias,
        logprobs=p.get("logprobs"),
        seed=int(seed),
        stop=list(p.get("stop", [])),
        grammar=None,
        compile_grammar=compile_grammar,
    )


def grammar_compile(m: Any, p: dict[str, Any]) -> Callable[[], str | None] | None:
    """The grammar compile of a generate's tools or json_schema, not yet run, or None
    when it has neither: compiled on its own thread (compiler.py), never on the
    reader, since a compile may take long or recurse deep."""
    if p.get("tools"):

        def compile_tools() -> str | None:
            grammar = tools.compile_tools(
                m.grammar_tokenizer,
                p["tools"],
                p.get("tool_choice"),
                p.get("parallel_tool_calls", True),
                p.get("json_schema"),
            )
            if grammar is None and "json_schema" in p:
                grammar = structured.compile_schema(m.grammar_tokenizer, p["json_schema"])
            return grammar

        return compile_tools
    if "json_schema" in p:
        return lambda: structured.compile_schema(m.grammar_tokenizer, p["json_schema"])
    return None
