"""Protocol round trips and the bad-input corpus, against the real process."""

from __future__ import annotations

import time

from conftest import rid


def test_runtime_info(rt) -> None:
    info = rt.result("runtime.info", {})
    assert info["device"] in ("cpu", "gpu")
    assert info["max_batch"] == 8
    assert "tiny" in info["models"]
    assert info["memory"]["active_bytes"] > 0


def test_health_without_params(rt) -> None:
    h = rt.result("health")
    assert h["ok"] is True and "tiny" in h["models"] and h["in_flight"] >= 0
    # Go marshals a nil params as null.
    rt.methods["null-params"] = "health"
    rt.send_raw('{"jsonrpc":"2.0","id":"null-params","method":"health","params":null}')
    assert rt.wait("null-params")["result"]["ok"] is True


def test_tokenize(rt) -> None:
    with_bos = rt.result("tokenize", {"model": "tiny", "text": "Hello world"})
    without = rt.result("tokenize", {"model": "tiny", "text": "Hello world", "add_special_tokens": False})
    assert with_bos["count"] == len(with_bos["tokens"]) == without["count"] + 1
    assert with_bos["tokens"][1:] == without["tokens"]


def _code(err):
    return err["code"], err["data"]["code"]


def test_bad_input_corpus_keeps_process_alive(rt, tiny_model) -> None:
    rt.send_raw("this is not json")
    assert _code(rt.wait(None)["error"]) == (-32700, "parse_error")
    rt.send_raw('{"jsonrpc":"1.0","id":"x1","method":"health"}')
    err = rt.wait("x1")["error"]
    assert _code(err) == (-32600, "invalid_request")
    rt.send_raw(b"\xff\xfe not utf8")
    assert _code(rt.wait(None)["error"]) == (-32700, "parse_error")
    rt.send_raw("[1,2,3]")
    assert _code(rt.wait(None)["error"]) == (-32600, "invalid_request")

    assert _code(rt.error("no.such.method", {})) == (-32601, "method_not_found")

    err = rt.error(
        "generate", {"request_id": "bad", "model": "tiny", "prompt": "x", "max_tokens": 0, "temperature": 9}
    )
    assert _code(err) == (-32602, "invalid_params")
    paths = {v["path"] for v in err["data"]["violations"]}
    assert {"$.max_tokens", "$.temperature"} <= paths

    err = rt.error("generate", {"request_id": "bad", "model": "tiny", "prompt": "x" * 262145})
    assert _code(err) == (-32602, "invalid_params")
    assert err["data"]["violations"][0]["path"] == "$.prompt"

    err = rt.error("generate", {"request_id": rid(), "model": "nope", "prompt": "x"})
    assert _code(err) == (-32001, "model_not_loaded")
    assert _code(rt.error("tokenize", {"model": "nope", "text": "x"})) == (-32001, "model_not_loaded")

    err = rt.error("generate", {"request_id": rid(), "model": "tiny", "prompt": "hello there " * 3000})
    assert _code(err) == (-32003, "context_exceeded")
    assert err["data"]["prompt_tokens"] > err["data"]["context_length"] == 2048

    err = rt.error(
        "generate",
        {
            "request_id": rid(),
            "model": "tiny",
            "prompt": "x",
            "json_schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}},
        },
    )
    assert _code(err) == (-32007, "invalid_schema")

    err = rt.error("model.load", {"model": str(tiny_model) + "-does-not-exist"})
    assert _code(err) == (-32002, "model_load_failed")

    # After all that, it still works.
    assert rt.result("health")["ok"] is True
    res = rt.result("generate", {"request_id": rid(), "model": "tiny", "prompt": "Hello", "max_tokens": 3})
    assert res["usage"]["completion_tokens"] == 3


def test_duplicate_request_id(rt) -> None:
    r = rid("dup")
    first = rt.request("generate", {"request_id": r, "model": "tiny", "prompt": "Hi", "max_tokens": 2000})
    err = rt.error("generate", {"request_id": r, "model": "tiny", "prompt": "Hi", "max_tokens": 5})
    assert _code(err) == (-32006, "duplicate_request")
    assert rt.result("cancel", {"request_id": r})["request_id"] == r
    assert rt.wait(first)["result"]["finish_reason"] == "cancelled"


def test_cancel_unknown_is_false(rt) -> None:
    assert rt.result("cancel", {"request_id": "never-seen"}) == {
        "request_id": "never-seen",
        "cancelled": False,
    }


def test_unload_then_generate(rt, tiny_model) -> None:
    rt.result("model.load", {"model": tiny_model, "id": "tiny-b"})
    assert "tiny-b" in rt.result("health")["models"]
    running = rt.request(
        "generate", {"request_id": rid(), "model": "tiny-b", "prompt": "Hi", "max_tokens": 2000}
    )
    assert rt.result("model.unload", {"id": "tiny-b"}) == {"id": "tiny-b", "unloaded": True}
    assert rt.wait(running)["result"]["finish_reason"] == "cancelled"
    err = rt.error("generate", {"request_id": rid(), "model": "tiny-b", "prompt": "x"})
    assert _code(err) == (-32001, "model_not_loaded")
    assert _code(rt.error("model.unload", {"id": "tiny-b"})) == (-32001, "model_not_loaded")
    assert "tiny-b" not in rt.result("runtime.info", {})["models"]


def test_too_many_models(new_runtime, tiny_model) -> None:
    r = new_runtime("--max-models", "1")
    assert r.result("model.load", {"model": tiny_model, "id": "a"})["load_time_ms"] > 0
    assert r.result("model.load", {"model": tiny_model, "id": "a"})["load_time_ms"] == 0  # idempotent
    err = r.error("model.load", {"model": tiny_model, "id": "b"})
    assert _code(err) == (-32002, "too_many_models")


def test_shutdown_drain_finishes_running_work(new_runtime, tiny_model) -> None:
    r = new_runtime()
    r.result("model.load", {"model": tiny_model, "id": "tiny"})
    g = r.request("generate", {"request_id": "d1", "model": "tiny", "prompt": "Hi", "max_tokens": 40})
    s = r.request("shutdown", {"mode": "drain"})
    res = r.wait(g)["result"]
    assert res["finish_reason"] == "length" and res["usage"]["completion_tokens"] == 40
    assert r.wait(s)["result"] == {"ok": True, "cancelled": 0}
    assert r.proc.wait(20) == 0


def test_shutdown_cancel(new_runtime, tiny_model) -> None:
    r = new_runtime()
    r.result("model.load", {"model": tiny_model, "id": "tiny"})
    g = r.request(
        "generate",
        {
            "request_id": "c1",
            "model": "tiny",
            "prompt": "Hi",
            "max_tokens": 2000,
            "temperature": 1,
            "seed": 1,
        },
    )
    deadline = time.monotonic() + 30
    while not r.chunks.get("c1") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r.chunks.get("c1"), "the generate never streamed"
    s = r.request("shutdown", {"mode": "cancel"})
    assert r.wait(g)["result"]["finish_reason"] == "cancelled"
    assert r.wait(s)["result"] == {"ok": True, "cancelled": 1}
    assert r.proc.wait(20) == 0
