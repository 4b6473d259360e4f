"""Property test of the runtime's stdin: random lines into one real runtime process.

Every line gets exactly one answer; an error answer carries a stable data.code (one
of docs/runtime-protocol.md's) with its matching JSON-RPC code; and the process
keeps answering `health`. Every line the runtime writes is validated against the
schemas by the Runtime reader (conftest), checked when the module's runtime stops.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from conftest import Runtime, start_runtime
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mlx_serving_runtime.protocol import ERROR_CODES, METHODS

ANSWER_TIMEOUT = 20.0
_ids = itertools.count()


@pytest.fixture(scope="module")
def fuzz_rt():
    r = start_runtime("--max-batch", "2")
    yield r
    assert r.proc.poll() is None, "the runtime exited during the fuzz run"
    assert r.close() == 0
    assert not r.violations, r.violations[:5]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)

# shutdown would end the process the test needs; every other method is fair game.
methods = st.sampled_from([m for m in METHODS if m != "shutdown"]) | st.text(max_size=16)

params_for = {
    "generate": st.fixed_dictionaries(
        {"request_id": st.text(max_size=8), "model": st.text(max_size=8)},
        optional={
            "prompt": st.text(max_size=20),
            "max_tokens": st.integers(-2, 40000),
            "temperature": json_values,
        },
    ),
    "model.load": st.fixed_dictionaries({"model": st.sampled_from(["/nonexistent/model", "", "x/y"])}),
    "tokenize": st.fixed_dictionaries({"model": st.text(max_size=8), "text": st.text(max_size=20)}),
    "cancel": st.fixed_dictionaries({"request_id": st.text(max_size=8)}),
}


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON object shaped more or less like a request; the id is set by the test."""
    msg: dict[str, Any] = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3))
    if draw(st.booleans()):
        msg["jsonrpc"] = draw(st.sampled_from(["2.0", "2.0", "1.0", 2]))
    method = draw(methods)
    if draw(st.integers(0, 9)) > 0:
        msg["method"] = method
    if method in params_for and draw(st.booleans()):
        msg["params"] = draw(params_for[method])
    elif draw(st.booleans()):
        msg["params"] = draw(json_values)
    msg.pop("id", None)
    return msg


def not_an_object(line: bytes) -> bool:
    try:
        return not isinstance(json.loads(line), dict)
    except (ValueError, UnicodeDecodeError):
        return True


garbage = (
    st.text(max_size=60).map(lambda s: s.replace("\n", " ").encode("utf-8", "surrogatepass"))
    | st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" "))
    | json_values.map(lambda v: json.dumps(v).encode())
)


def check_error(err: dict[str, Any]) -> None:
    code = err.get("data", {}).get("code")
    assert code in ERROR_CODES, err
    assert err["code"] == ERROR_CODES[code], err


def still_healthy(rt: Runtime) -> None:
    r = rt.call("health", timeout=ANSWER_TIMEOUT)
    assert r.get("result", {}).get("ok") is True, r


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(line=garbage)
def test_garbage_lines_get_a_coded_error(fuzz_rt: Runtime, line: bytes) -> None:
    assume(line.strip() and not_an_object(line))
    fuzz_rt.send_raw(line)
    answer = fuzz_rt.wait(None, timeout=ANSWER_TIMEOUT)
    assert "error" in answer, answer
    check_error(answer["error"])
    assert answer["error"]["data"]["code"] in ("parse_error", "invalid_request"), answer
    still_healthy(fuzz_rt)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=requests())
def test_request_shaped_objects_get_one_answer(fuzz_rt: Runtime, msg: dict[str, Any]) -> None:
    rpc_id = f"fz-{next(_ids)}"
    msg["id"] = rpc_id
    if msg.get("method") in METHODS:
        fuzz_rt.methods[rpc_id] = msg["method"]  # so the reader validates a result by its schema
    fuzz_rt.send_raw(json.dumps(msg))
    answer = fuzz_rt.wait(rpc_id, timeout=ANSWER_TIMEOUT)
    assert ("result" in answer) != ("error" in answer), answer
    if "error" in answer:
        check_error(answer["error"])
    still_healthy(fuzz_rt)
