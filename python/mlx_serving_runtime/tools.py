"""Tool calls: render tools through the chat template and constrain decoding to calls.

A call is written the way Hermes/Qwen-style templates teach models to write it:

    <tool_call>
    {"name": "get_weather", "arguments": {"city":"Paris"}}
    </tool_call>

One grammar (llguidance lark, arguments as inline %json of the function's parameters
schema) forces that shape, so a call always parses and its arguments validate:

- required: one call (or several, with parallel calls) of any listed function;
- a named function: calls of that function only;
- auto: plain text that never contains the call marker, or text (maybe none) then
  calls: once the marker is written, a valid call must follow;
- none: plain text that never contains the call marker.

The gateway parses the text back into OpenAI's tool_calls (gateway/tools.go); the
marker and the JSON layout above are the contract between the two.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

from . import structured
from .protocol import RpcError

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

# Compact JSON in arguments: no optional whitespace, so the text is what the gateway
# hands out as the arguments string.
_JSON_OPTS = {"whitespace_flexible": False}
# A function without parameters takes none (OpenAI: "omitting parameters defines a
# function with an empty parameter list").
_NO_PARAMS = {"type": "object", "properties": {}, "additionalProperties": False}
# Text that never contains the call marker: a call cannot hide in an answer.
_TEXT = f"TEXT: /(?s:.*)/ & ~/(?s:.*){CALL_OPEN}(?s:.*)/"


def _lit(s: str) -> str:
    """A lark string literal (JSON escaping is valid lark escaping)."""
    return json.dumps(s)


def _args_schema(fn: dict[str, Any]) -> dict[str, Any]:
    params = fn.get("parameters")
    schema = dict(params) if params else dict(_NO_PARAMS)
    schema["x-guidance"] = _JSON_OPTS
    return schema


def choice_mode(tool_choice: Any) -> tuple[str, str | None]:
    """("auto"|"none"|"required", None) or ("function", name)."""
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        return tool_choice, None
    return "function", tool_choice["function"]["name"]


def grammar_lark(
    tools: list[dict[str, Any]],
    tool_choice: Any = None,
    parallel: bool = True,
    json_schema: dict[str, Any] | None = None,
) -> str | None:
    """The lark grammar for a request with tools, or None when nothing is constrained."""
    mode, name = choice_mode(tool_choice)
    fns = [t["function"] for t in tools]
    if mode == "function":
        fns = [f for f in fns if f["name"] == name]
        if not fns:
            raise RpcError(
                "invalid_params",
                f"tool_choice names {name!r}, which is not among the tools",
                violations=[{"path": "$.tool_choice.function.name", "reason": "not among the tools"}],
            )
    if mode == "none" and json_schema is not None:
        return None  # plain structured output: the caller compiles json_schema
    lines = ["%llguidance {}"]
    if json_schema is not None and mode == "auto":
        answer = dict(json_schema)
        answer["x-guidance"] = _JSON_OPTS
        lines.append(f"answer: %json {json.dumps(answer)}")
    if mode == "none":
        lines += [_TEXT, "start: TEXT"]
        return "\n".join(lines) + "\n"
    more = ' ("\\n" call)*' if parallel else ""
    if mode in ("required", "function"):
        lines.append("start: call" + more)
    elif json_schema is not None:
        lines.append(f"start: answer | call{more}")
    else:
        # Text, then maybe calls: the lazy head ends at the first marker, after which
        # only a call can follow (the text alternative never holds the marker).
        lines += [_TEXT, f"start: TEXT | call_head call_body{more}"]
        lines.append(f"call_head[lazy]: ANY {_lit(CALL_OPEN)}")
        lines.append("ANY: /(?s:.*)/")
    lines.append(f"call: {_lit(CALL_OPEN)} call_body")
    body_open, body_close = _lit('\n{"name": '), _lit("}\n" + CALL_CLOSE)
    lines.append(f"call_body: {body_open} fn {body_close}")
    lines.append("fn: " + " | ".join(f"fn_{i}" for i in range(len(fns))))
    for i, f in enumerate(fns):
        prefix = json.dumps(f["name"]) + ', "arguments": '
        lines.append(f"fn_{i}: {_lit(prefix)} %json {json.dumps(_args_schema(f))}")
    return "\n".join(lines) + "\n"


def compile_tools(
    cache: structured.TokenizerCache,
    tools: list[dict[str, Any]],
    tool_choice: Any = None,
    parallel: bool = True,
    json_schema: dict[str, Any] | None = None,
) -> str | None:
    """An llguidance grammar for the request, or None; raise invalid_schema when a
    function's parameters cannot be compiled."""
    lark = grammar_lark(tools, tool_choice, parallel, json_schema)
    if lark is None:
        return None
    try:
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    except (ValueError, TypeError) as e:
        raise RpcError("invalid_schema", f"tools: {e}") from e
    err = llguidance.LLMatcher.validate_grammar(grammar, cache.get())
    if err and not err.startswith("WARNING"):
        raise RpcError("invalid_schema", f"tools: {err}")
    return grammar


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as HF chat templates expect them: a call's arguments as an object
    (templates apply tojson to them), not OpenAI's JSON string."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if not calls:
            out.append(m)
            continue
        conv = []
        for c in calls:
            fn = dict(c["function"])
            try:
                args = json.loads(fn.get("arguments") or "{}")
            except ValueError:
                args = None
            if isinstance(args, dict):
                fn["arguments"] = args
            conv.append({**c, "function": fn})
        out.append({**m, "tool_calls": conv})
    return out
