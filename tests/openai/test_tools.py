"""Tool calls through the official openai client against a real `mlx-serving up`.

The tiny model has random weights: its calls parse and validate only because decoding
is constrained to them (python/mlx_serving_runtime/tools.py).
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

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
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "lookup", "parameters": LOOKUP}},
]
SCHEMA_OF = {"get_weather": WEATHER, "lookup": LOOKUP}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(up):
    return openai.OpenAI(base_url=up.base_url, api_key="unused", max_retries=0, timeout=120)


def check_call(call, names=SCHEMA_OF) -> dict:
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name in names
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMA_OF[call.function.name])
    return args


def test_required_calls_always_parse_and_validate(client, up):
    """Mutation caught: python/mlx_serving_runtime/request.py not compiling the tools
    grammar (the answer is random text: no tool_calls, finish_reason length)."""
    names = set()
    for seed in range(20):
        r = client.chat.completions.create(
            model=up.model, messages=MESSAGES, tools=TOOLS, tool_choice="required",
            parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=200,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        check_call(choice.message.tool_calls[0])
        names.add(choice.message.tool_calls[0].function.name)
    assert names == {"get_weather", "lookup"}


def test_named_function_streamed(client, up):
    """Streamed as OpenAI's deltas: the first names the call, the rest carry its
    arguments; the openai client's own accumulation gives a valid call."""
    for seed in range(5):
        stream = client.chat.completions.create(
            model=up.model, messages=MESSAGES, tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "lookup"}},
            temperature=1.0, seed=seed, max_tokens=200, stream=True, parallel_tool_calls=False,
        )
        calls: dict[int, dict] = {}
        finish, content, deltas = None, "", 0
        for chunk in stream:
            for c in chunk.choices:
                content += c.delta.content or ""
                finish = c.finish_reason or finish
                for d in c.delta.tool_calls or []:
                    deltas += 1
                    acc = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                    if d.id:
                        assert acc["id"] is None, "a call named twice"
                        acc["id"], acc["name"] = d.id, d.function.name
                        assert d.type == "function"
                    acc["arguments"] += d.function.arguments or ""
        assert finish == "tool_calls"
        assert content == ""
        assert list(calls) == [0] and deltas >= 2
        call = calls[0]
        assert call["id"].startswith("call_") and call["name"] == "lookup"
        jsonschema.validate(json.loads(call["arguments"]), LOOKUP)


def test_auto_is_text_or_a_valid_call(client, up):
    for seed in range(6):
        r = client.chat.completions.create(
            model=up.model, messages=MESSAGES, tools=TOOLS, tool_choice="auto",
            temperature=1.0, seed=seed, max_tokens=40,
        )
        m = r.choices[0].message
        if m.tool_calls:
            for c in m.tool_calls:
                check_call(c)
        else:
            assert m.content is not None and "<tool_call>" not in m.content


def test_none_answers_text(client, up):
    r = client.chat.completions.create(
        model=up.model, messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=20,
    )
    m = r.choices[0].message
    assert not m.tool_calls
    assert m.content and "<tool_call>" not in m.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_tool_result_round_trip(client, up):
    """The assistant's call and the tool's answer go back as history (the client's own
    message objects); the tools are rendered into the prompt.

    Mutation caught: python/mlx_serving_runtime/request.py not passing tools= to
    apply_chat_template (the prompt with tools counts no more tokens than without)."""
    first = client.chat.completions.create(
        model=up.model, messages=MESSAGES, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, seed=3, max_tokens=200,
    )
    call = first.choices[0].message.tool_calls[0]
    history = MESSAGES + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny"})},
    ]
    with_tools = client.chat.completions.create(
        model=up.model, messages=history, tools=TOOLS, tool_choice="none", max_tokens=5,
    )
    without = client.chat.completions.create(model=up.model, messages=history, max_tokens=5)
    assert with_tools.choices[0].message.content is not None
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens + 50


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "nonsense"}}}}}]}, "tools[0].function.parameters"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "two words"}}]}, "tools[0].function.name"),
    ],
)
def test_bad_tools_are_400_naming_the_field(client, up, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=up.model, messages=MESSAGES, max_tokens=5, **kwargs)
    assert e.value.body["param"] == param, e.value.body
