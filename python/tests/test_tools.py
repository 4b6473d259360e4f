"""Tool calls through the pipe: tools rendered by the chat template, calls forced by the grammar.

The tiny model's weights are random: a well-formed call only happens because decoding
is constrained, which is what these tests show.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from conftest import rid

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
LOOKUP = {
    "type": "object",
    "properties": {"ids": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                           "minItems": 1, "maxItems": 3}},
    "required": ["ids"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function",
     "function": {"name": "get_weather", "description": "Weather.", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "lookup", "parameters": LOOKUP}},
    {"type": "function", "function": {"name": "ping"}},  # no parameters: takes none
]
SCHEMA_OF = {"get_weather": WEATHER, "lookup": LOOKUP,
             "ping": {"type": "object", "properties": {}, "additionalProperties": False}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.S)


def calls_of(text: str) -> list[dict]:
    """The calls of a text that is calls only: each parses and validates."""
    calls = [json.loads(body) for body in CALL.findall(text)]
    assert CALL.sub("", text).strip() == "", f"text outside calls: {text!r}"
    for c in calls:
        assert set(c) == {"name", "arguments"}, c
        jsonschema.validate(c["arguments"], SCHEMA_OF[c["name"]])
    return calls


def generate_many(rt, n: int, **params) -> list[dict]:
    """n generates sent at once. A structured one past the runtime's per-tenant
    compile cap (4 running) is refused runtime_busy, as a worker's would be; like the
    worker (worker/busy.go), it is sent again, here once all the others are answered,
    so nothing else compiles then. On a 2-core CI runner 8 compiles overlapped."""
    reqs = [
        {"request_id": rid("tool"), "model": "tiny", "messages": MESSAGES, "tools": TOOLS,
         "max_tokens": 200, "temperature": 1.0, "seed": s, **params}
        for s in range(n)
    ]
    answers = [rt.wait(i) for i in [rt.request("generate", p) for p in reqs]]
    out = []
    for p, r in zip(reqs, answers, strict=True):
        if r.get("error", {}).get("data", {}).get("code") == "runtime_busy":
            r = rt.call("generate", p)
        assert "result" in r, r
        out.append(r["result"])
    return out


def test_required_always_calls_and_arguments_validate(rt) -> None:
    """Mutation caught: request.py not setting grammar from tools.compile_tools (the
    random model writes no <tool_call>; calls_of finds none)."""
    names = set()
    for res in generate_many(rt, 20, tool_choice="required", parallel_tool_calls=False):
        assert res["finish_reason"] == "stop", res  # EOS forced once the call is complete
        calls = calls_of(res["text"])
        assert len(calls) == 1, res["text"]
        names.add(calls[0]["name"])
    assert len(names) > 1  # sampling really chose among the functions


def test_named_function_only(rt) -> None:
    """Mutation caught: tools.grammar_lark ignoring the named function (other names appear)."""
    for res in generate_many(rt, 20, tool_choice={"type": "function", "function": {"name": "lookup"}},
                             parallel_tool_calls=False):
        assert res["finish_reason"] == "stop", res
        calls = calls_of(res["text"])
        assert [c["name"] for c in calls] == ["lookup"], res["text"]


def test_parallel_calls_each_validate(rt) -> None:
    """With parallel calls, every complete call validates; a row cut by max_tokens ends
    inside a call, never outside the grammar."""
    for res in generate_many(rt, 8, tool_choice="required", max_tokens=300):
        text = res["text"]
        if res["finish_reason"] == "stop":
            assert len(calls_of(text)) >= 1
        else:
            complete = text[: text.rfind("</tool_call>") + len("</tool_call>")]
            calls_of(complete)


GT = "32"  # the tiny tokenizer's id of ">"


def test_auto_is_text_or_calls(rt) -> None:
    """Plain text in auto mode never holds the call marker; once the marker is written
    (here: the text so far ends in "<tool_call" and ">" is pushed by logit_bias), a valid
    call follows, also after some text.

    Mutation caught: tools.grammar_lark's call_head without [lazy] (the biased ">" is
    taken as text, the marker with it: the rows run to max_tokens, no call).
    """
    for res in generate_many(rt, 10, tool_choice="auto", parallel_tool_calls=False, max_tokens=60):
        assert not res["text"].startswith("<tool_call>")
        assert "<tool_call>" not in res["text"], res["text"]
    for prefix in ("<tool_call", "Sure. <tool_call"):
        for res in generate_many(rt, 6, tool_choice="auto", parallel_tool_calls=False,
                                 continuation=prefix, logit_bias={GT: 100}):
            assert res["finish_reason"] == "stop", res
            text = prefix + res["text"]
            lead = text[: text.index("<tool_call>")]
            assert lead == prefix.removesuffix("<tool_call"), text
            calls = calls_of(text[len(lead):])
            assert len(calls) == 1


def test_auto_with_json_schema_is_json_or_calls(rt) -> None:
    """With response_format's schema, auto's text alternative is that schema's JSON."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    for res in generate_many(rt, 8, tool_choice="auto", json_schema=schema, parallel_tool_calls=False):
        assert res["finish_reason"] == "stop", res
        if res["text"].startswith("<tool_call>"):
            calls_of(res["text"])
        else:
            jsonschema.validate(json.loads(res["text"]), schema)


def test_none_never_calls(rt) -> None:
    """Mutation caught: tools.grammar_lark returning no grammar for tool_choice none
    (the biased ">" completes "<tool_call>")."""
    for res in generate_many(rt, 10, tool_choice="none", max_tokens=20, continuation="<tool_call",
                             logit_bias={GT: 100}):
        assert "<tool_call>" not in "<tool_call" + res["text"], res["text"]
        assert not res["text"].startswith(">")


def test_tools_rendered_and_round_trip_accepted(rt) -> None:
    """Mutation caught: request.py not passing tools= to apply_chat_template (the
    prompt counts the same tokens as without tools)."""
    history = MESSAGES + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"c","days":1}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    res = rt.result("generate", {"request_id": rid(), "model": "tiny", "messages": history,
                                 "tools": TOOLS[:1], "tool_choice": "none", "max_tokens": 3})
    rendered = (
        "<s><|system|>\n# Tools\n\nYou may call functions. Their signatures:\n<tools>\n"
        + json.dumps(TOOLS[0]) + "\n</tools>\n"
        "Write each call as <tool_call>\n{\"name\": <name>, \"arguments\": <arguments object>}\n"
        "</tool_call><|end|>\n"
        "<|user|>\nWhat is the weather in Paris?<|end|>\n"
        "<|assistant|>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
        "{\"city\": \"Paris\", \"unit\": \"c\", \"days\": 1}}\n</tool_call><|end|>\n"
        "<|tool|>\nsunny<|end|>\n<|assistant|>\n"
    )
    n = rt.result("tokenize", {"model": "tiny", "text": rendered, "add_special_tokens": False})["count"]
    assert res["usage"]["prompt_tokens"] == n


def test_unknown_named_function_refused(rt) -> None:
    r = rt.call("generate", {"request_id": rid(), "model": "tiny", "messages": MESSAGES, "tools": TOOLS,
                             "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert r["error"]["data"]["code"] == "invalid_params", r


@pytest.mark.parametrize("params", [{"type": "object", "properties": {"x": {"type": "nonsense"}}}])
def test_bad_parameters_schema_refused(rt, params) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    r = rt.call("generate", {"request_id": rid(), "model": "tiny", "messages": MESSAGES, "tools": tools,
                             "tool_choice": "required"})
    assert r["error"]["data"]["code"] == "invalid_schema", r


@pytest.mark.parametrize("cut", [3, 20, 47, 60])
def test_resumed_mid_call_completes_it(rt, cut) -> None:
    """A job migrated mid-call resumes with its text so far as continuation: the
    grammar takes it as already written and the call is completed validly."""
    first = generate_many(rt, 1, tool_choice="required", parallel_tool_calls=False)[0]
    assert first["finish_reason"] == "stop"
    so_far = first["text"][:cut]
    for res in generate_many(rt, 3, tool_choice="required", parallel_tool_calls=False, continuation=so_far):
        assert res["finish_reason"] == "stop", res
        calls_of(so_far + res["text"])
