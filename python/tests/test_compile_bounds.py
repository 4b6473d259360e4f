"""Red team round 8: schemas that crashed (N1: a $ref chain overflowed llguidance's
native stack) or wedged (N2: patternProperties compiled for minutes on the reader
thread) the runtime. Refused by the schema bounds before compiling; and, with the
bounds switched off in the runtime process, compiled on a large-stack thread under a
time limit while the reader goes on answering."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from conftest import SCHEMAS, Runtime, rid

SMALL = {"model": "tiny", "prompt": "x", "max_tokens": 4}


def object_chain(n: int) -> dict:
    defs = {
        f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}}, "required": ["a"]}
        for i in range(n)
    }
    return {"$defs": {**defs, f"d{n}": {"type": "string"}}, "$ref": "#/$defs/d0"}


def alias_chain(n: int) -> dict:
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(n)}
    return {"$defs": {**defs, f"d{n}": {"type": "string"}}, "$ref": "#/$defs/d0"}


def pattern_props(n: int) -> dict:
    return {"type": "object", "patternProperties": {f"^x{i}[a-z]*$": {"type": "string"} for i in range(n)}}


TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 4},
                "children": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/node"}},
            },
            "required": ["name"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/node",
}


@pytest.mark.parametrize("schema", [object_chain(950), alias_chain(2500)], ids=["objects950", "aliases2500"])
def test_ref_chains_refused_and_runtime_lives(rt, schema) -> None:
    """The red team's N1 sizes, as json_schema and as a tool's parameters, are
    invalid_params at the field (too deep, refs followed); the runtime is alive after.
    Mutation caught: schema_bounds.follow returning 0 (the chains reach the compiler
    and are answered by it)."""
    err = rt.error("generate", {**SMALL, "request_id": rid(), "json_schema": schema})
    assert err["data"]["code"] == "invalid_params", err
    assert err["data"]["violations"] == [
        {
            "path": "$.json_schema",
            "reason": "nests objects and arrays more than 64 levels deep (local $refs followed)",
        }
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    err = rt.error(
        "generate",
        {
            "request_id": rid(),
            "model": "tiny",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "x"}],
            "tools": tools,
        },
    )
    assert err["data"]["code"] == "invalid_params", err
    assert err["data"]["violations"][0]["path"] == "$.tools[0].function.parameters", err
    assert rt.result("health", {})["ok"]


def test_pattern_count_refused(rt) -> None:
    """N2's 500 patternProperties (73 s to compile) are refused by the count bound;
    64 compile and generate. Mutation caught: the patternProperties count removed
    from schema_bounds (the 500 compile for a minute and more)."""
    err = rt.error("generate", {**SMALL, "request_id": rid(), "json_schema": pattern_props(500)})
    assert err["data"]["code"] == "invalid_params", err
    assert "more than 64 patterns" in err["data"]["violations"][0]["reason"], err
    res = rt.result("generate", {**SMALL, "request_id": rid(), "json_schema": pattern_props(64)})
    assert res["usage"]["completion_tokens"] >= 1


def test_recursive_tree_schema_generates(rt) -> None:
    """Legal recursion (a node whose children are nodes) passes the bounds, compiles
    and generates. Mutation caught: schema_bounds' on_path check removed (the tree
    is refused as too deep)."""
    res = rt.result("generate", {**SMALL, "request_id": rid(), "max_tokens": 40, "json_schema": TREE})
    assert res["usage"]["completion_tokens"] >= 1
    assert res["text"].startswith("{"), res


def start_unbounded(limit_s: float) -> Runtime:
    """A real runtime process with the schema bounds switched off (depth_violations
    answering nothing) and the compile limit set to limit_s: what reaches the compiler
    if a schema inside the bounds compiles slowly or deep."""
    code = (
        "import mlx_serving_runtime.validation as v, mlx_serving_runtime.compiler as c;"
        f"v.depth_violations = lambda p: []; c.COMPILE_LIMIT_S = {limit_s!r};"
        "from mlx_serving_runtime.__main__ import run; run()"
    )
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", MLX_SERVING_SCHEMAS=str(SCHEMAS), MLX_SERVING_LOG_LEVEL="WARNING"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    r = Runtime(proc)
    threading.Thread(target=r.read_loop, daemon=True).start()
    return r


@pytest.fixture()
def unbounded(tiny_model):
    r = start_unbounded(2.0)
    assert r.result("model.load", {"model": tiny_model, "id": "tiny"})["id"] == "tiny"
    yield r
    assert r.close() == 0
    assert not r.violations, r.violations


def test_slow_compile_times_out_while_runtime_answers(unbounded) -> None:
    """A compile of minutes (400 patternProperties: 16 s here) is answered
    invalid_schema at the limit; before that, health and a plain generate sent after
    it are answered; after it, a schema compiles though the slow compile still runs.
    Mutation caught: handle() compiling on the reader (health waits for the compile:
    the slow generate is answered first)."""
    r = unbounded
    slow = r.request("generate", {**SMALL, "request_id": rid(), "json_schema": pattern_props(400)})
    assert r.result("health", {})["ok"]
    res = r.result("generate", {**SMALL, "request_id": rid()})
    assert res["usage"]["completion_tokens"] >= 1
    assert r._q(slow).empty(), "the slow compile was answered before health and a plain generate"
    err = r.wait(slow)["error"]
    assert err["data"]["code"] == "invalid_schema", err
    assert err["message"] == "schema too complex to compile in 2 s", err
    res = r.result(
        "generate", {**SMALL, "request_id": rid(), "json_schema": {"type": "string", "maxLength": 3}}
    )
    assert res["text"].startswith('"'), res


def test_deep_grammar_compiles_on_large_stack(unbounded) -> None:
    """A 2,000-object $ref chain, which overflows an 8 MiB stack in llguidance
    (SIGSEGV, the process gone), compiles on the compile thread's 256 MiB stack: the
    generate is answered and the runtime lives. Mutation caught: the compile thread
    started with the default stack size (the runtime dies)."""
    r = unbounded
    out = r.call("generate", {**SMALL, "request_id": rid(), "json_schema": object_chain(2000)})
    assert "result" in out or out["error"]["data"]["code"] == "invalid_schema", out
    assert r.result("health", {})["ok"]
