"""Drive the real runtime process over its pipes, on the tiny model, validating every line it writes."""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mlx_serving_runtime import validation
from mlx_serving_runtime.protocol import schema_type

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "schemas"
TIMEOUT = 60.0


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    env = os.environ.get("MLX_SERVING_TINY_MODEL")
    # A model written before the template learned tools (test_tools) is written afresh.
    fresh = env and "tool_call" in _read(Path(env) / "chat_template.jinja")
    if fresh and (Path(env) / "config.json").exists() and (Path(env) / "model.safetensors").exists():
        return env
    out = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([sys.executable, "-m", "mlx_serving_runtime.tinymodel", str(out)], check=True, timeout=120)
    return str(out)


@dataclass
class Chunk:
    at: float
    params: dict[str, Any]


@dataclass
class Runtime:
    proc: subprocess.Popen
    methods: dict[Any, str] = field(default_factory=dict)  # rpc id -> method, to validate results
    responses: dict[Any, queue.Queue] = field(default_factory=dict)
    chunks: dict[str, list[Chunk]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    lines: int = 0
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _q(self, rpc_id: Any) -> queue.Queue:
        with self._lock:
            return self.responses.setdefault(rpc_id, queue.Queue())

    def read_loop(self) -> None:
        for raw in self.proc.stdout:
            self.lines += 1
            try:
                msg = json.loads(raw)
            except ValueError:
                self.violations.append(f"stdout line is not JSON: {raw[:200]!r}")
                continue
            now = time.monotonic()
            if "method" in msg:
                self._check("runtime.notification", msg)
                self._check("runtime.generate.chunk", msg.get("params"))
                p = msg.get("params", {})
                with self._lock:
                    self.chunks.setdefault(p.get("request_id"), []).append(Chunk(now, p))
                continue
            self._check("runtime.response", msg)
            method = self.methods.get(msg.get("id"))
            if "result" in msg and method is not None:
                self._check(schema_type(method) + ".result", msg["result"])
            self._q(msg.get("id")).put(msg)

    def _check(self, type_name: str, doc: Any) -> None:
        bad = validation.violations(type_name, doc)
        if bad:
            self.violations.append(f"{type_name}: {bad} in {json.dumps(doc)[:300]}")

    def send_raw(self, line: str | bytes) -> None:
        data = line.encode() if isinstance(line, str) else line
        self.proc.stdin.write(data + b"\n")
        self.proc.stdin.flush()

    def request(self, method: str, params: dict[str, Any] | None = None, rpc_id: Any = None) -> Any:
        rpc_id = next(self._ids) if rpc_id is None else rpc_id
        self.methods[rpc_id] = method
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rpc_id, "method": method}
        if params is not None:
            msg["params"] = params
        self.send_raw(json.dumps(msg))
        return rpc_id

    def wait(self, rpc_id: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
        try:
            return self._q(rpc_id).get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no response to id {rpc_id!r} within {timeout}s") from None

    def call(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        return self.wait(self.request(method, params), timeout)

    def result(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        r = self.call(method, params)
        assert "result" in r, r
        return r["result"]

    def error(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        r = self.call(method, params)
        assert "error" in r, r
        return r["error"]

    def text_of(self, request_id: str) -> str:
        return "".join(c.params["text"] for c in self.chunks.get(request_id, []))

    def close(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def start_runtime(*args: str) -> Runtime:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", MLX_SERVING_SCHEMAS=str(SCHEMAS), MLX_SERVING_LOG_LEVEL="WARNING"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_serving_runtime", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    rt = Runtime(proc)
    threading.Thread(target=rt.read_loop, daemon=True).start()
    return rt


@pytest.fixture()
def new_runtime():
    started: list[Runtime] = []

    def start(*args: str) -> Runtime:
        rt = start_runtime(*args)
        started.append(rt)
        return rt

    yield start
    for rt in started:
        rt.close()
        assert not rt.violations, rt.violations


@pytest.fixture(scope="session")
def rt(tiny_model: str):
    """One runtime with the tiny model loaded as "tiny", shared by the tests that only generate."""
    r = start_runtime("--max-batch", "8")
    res = r.result("model.load", {"model": tiny_model, "id": "tiny"})
    assert res["id"] == "tiny"
    yield r
    code = r.close()
    assert code == 0
    assert not r.violations, r.violations


_rid = itertools.count()


def rid(prefix: str = "r") -> str:
    return f"{prefix}-{next(_rid)}"
