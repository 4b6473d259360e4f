"""A request line nested deeper than Python can parse or validate is refused on its
own; the runtime keeps answering (red-team F3: such a line once ended the process,
failing every request in flight whoever sent it)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from conftest import SCHEMAS, Runtime, rid

from mlx_serving_runtime.__main__ import salvage_id


def _deep_schema(levels: int) -> dict:
    v: dict = {"type": "string"}
    for _ in range(levels - 1):
        v = {"type": "array", "items": v}
    return v


def _code(err: dict) -> tuple[int, str]:
    return err["code"], err["data"]["code"]


def _still_serves(rt, tiny: str) -> None:
    assert rt.result("health")["ok"] is True
    r = rid("after-deep")
    res = rt.result("generate", {"request_id": r, "model": tiny, "prompt": "hello", "max_tokens": 3})
    assert res["usage"]["completion_tokens"] >= 1


def test_deep_lines_answer_errors_and_the_runtime_lives(new_runtime, tiny_model: str) -> None:
    """Mutation caught: handle()'s parse catching only ValueError/UnicodeDecodeError (the
    old clause): the 5000-deep line ends the process and the health call gets no answer."""
    rt = new_runtime()
    rt.result("model.load", {"model": tiny_model, "id": "tiny"})
    # json.loads itself recurses past the limit: parse_error, answered to the line's id.
    deep = '{"type":"array","items":' * 4999 + '{"type":"string"}' + "}" * 4999  # too deep for json.dumps
    rt.send_raw(
        '{"jsonrpc":"2.0","id":"deep-schema","method":"generate","params":'
        '{"request_id":"r-deep","model":"tiny","prompt":"x","json_schema":' + deep + "}}"
    )
    assert _code(rt.wait("deep-schema")["error"]) == (-32700, "parse_error")
    _still_serves(rt, "tiny")
    # No id to be found in a bare deep array: answered with a null id.
    rt.send_raw("[" * 100000 + "]" * 100000)
    assert _code(rt.wait(None)["error"]) == (-32700, "parse_error")
    _still_serves(rt, "tiny")


def test_over_bound_schema_is_invalid_params(rt) -> None:
    """A json_schema that parses (900 deep) but nests past the bound is refused before
    jsonschema or llguidance see it, at its path. Mutation caught: the depth check
    left out of validation.violations (the answer is another code, or none)."""
    for levels, path in ((900, "$.json_schema"), (65, "$.json_schema")):
        err = rt.error(
            "generate",
            {"request_id": rid("deep"), "model": "tiny", "prompt": "x", "json_schema": _deep_schema(levels)},
        )
        assert _code(err) == (-32602, "invalid_params"), err
        assert err["data"]["violations"][0]["path"] == path, err
    tools = [
        {"type": "function", "function": {"name": "a"}},
        {"type": "function", "function": {"name": "b", "parameters": _deep_schema(65)}},
    ]
    err = rt.error(
        "generate",
        {
            "request_id": rid("deep"),
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}],
            "tools": tools,
        },
    )
    assert _code(err) == (-32602, "invalid_params"), err
    assert err["data"]["violations"][0]["path"] == "$.tools[1].function.parameters", err
    # At the bound: compiled and run.
    res = rt.result(
        "generate",
        {
            "request_id": rid("deep"),
            "model": "tiny",
            "prompt": "x",
            "max_tokens": 2,
            "json_schema": _deep_schema(64),
        },
    )
    assert res["usage"]["completion_tokens"] >= 1


def test_salvage_id() -> None:
    deep = "[" * 5000 + "]" * 5000
    assert salvage_id(b'{"jsonrpc":"2.0","id":7,"params":' + deep.encode() + b"}") == 7
    assert salvage_id(b'{"params":{"id":"inner","x":"\\"{["},"id" : "outer-\\"1"}') == 'outer-"1'
    assert salvage_id(deep.encode()) is None
    assert salvage_id(b'{"id":[1]}') is None
    assert salvage_id(b'{"id":"unterminated') is None
    assert salvage_id(b"\xff{") is None


# The runtime, with every structured-output row's processing raising, as a library
# surprise deep in llguidance would (a RecursionError is a RuntimeError).
_FAULTY = """
from mlx_serving_runtime import structured
def _raise(self, tokens, logits):
    raise RecursionError("injected: processing recursed too deep")
structured.JsonConstraint._constrain = _raise
from mlx_serving_runtime.__main__ import run
run()
"""


def test_structured_processing_failure_fails_that_request_only(tiny_model: str) -> None:
    """A row whose grammar processing raises fails alone (generation_failed), while a
    row of another client decoding in the same batch finishes. Mutation caught: the
    try/except in JsonConstraint.__call__ removed (the failed step fails every row of
    the model, the plain one too)."""
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", MLX_SERVING_SCHEMAS=str(SCHEMAS), MLX_SERVING_LOG_LEVEL="WARNING"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", _FAULTY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    rt = Runtime(proc)
    threading.Thread(target=rt.read_loop, daemon=True).start()
    try:
        rt.result("model.load", {"model": tiny_model, "id": "tiny"})
        plain = rid("plain")
        plain_rpc = rt.request(
            "generate",
            {"request_id": plain, "model": "tiny", "prompt": "Go on", "max_tokens": 300, "seed": 1},
        )
        deadline = time.monotonic() + 30
        while len(rt.chunks.get(plain, [])) < 3:  # decoding: the next row joins its batch
            assert time.monotonic() < deadline, "no 3 chunks of the plain generate within 30s"
            time.sleep(0.005)
        err = rt.error(
            "generate",
            {
                "request_id": rid("json"),
                "model": "tiny",
                "prompt": "x",
                "max_tokens": 50,
                "json_schema": {"type": "object"},
            },
        )
        assert _code(err) == (-32004, "generation_failed"), err
        assert "RecursionError" in err["message"], err
        res = rt.wait(plain_rpc)
        assert res.get("result", {}).get("finish_reason") == "length", res
        assert rt.result("health")["in_flight"] == 0
    finally:
        assert rt.close() == 0
    assert not rt.violations, rt.violations
