"""JSON-RPC 2.0 framing for the runtime pipe: envelopes, error codes, one locked writer."""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any, BinaryIO

from mlx_serving_runtime.validation import schemas_dir

log = logging.getLogger("mlx_serving_runtime")

JSONRPC = "2.0"


def _load_error_codes() -> dict[str, int]:
    """Stable error code (data.code) -> JSON-RPC error number, from schemas/codes/errors.json:
    the one list Go names in schemas/codes.go. Only codes with an "rpc" number are the
    runtime's to send. A missing or malformed file fails the import, so the runtime
    does not start (the worker sees it exit) instead of answering codes Go does not know."""
    path = schemas_dir() / "codes" / "errors.json"
    try:
        codes = json.loads(path.read_text())["codes"]
    except (OSError, ValueError, KeyError) as e:
        raise RuntimeError(f"cannot read the error codes {path}: {e} (set MLX_SERVING_SCHEMAS)") from e
    return {c["code"]: c["rpc"] for c in codes if "rpc" in c}


ERROR_CODES: dict[str, int] = _load_error_codes()

METHODS = (
    "runtime.info",
    "health",
    "shutdown",
    "model.load",
    "model.unload",
    "generate",
    "cancel",
    "tokenize",
)


def schema_type(method: str) -> str:
    """The schema type prefix of a method: "generate" -> "runtime.generate"."""
    return method if method.startswith("runtime.") else "runtime." + method


class RpcError(Exception):
    """An error answered to one request; never fatal for the process."""

    def __init__(self, code: str, message: str, **data: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_error(self) -> dict[str, Any]:
        return {
            "code": ERROR_CODES[self.code],
            "message": self.message[:2048],
            "data": {"code": self.code, **self.data},
        }


def duplicate_request(request_id: str) -> RpcError:
    """The error for a generate whose request_id is already in flight (compiling or running)."""
    return RpcError(
        "duplicate_request", f"request_id {request_id!r} is already in flight", request_id=request_id
    )


def invalid_params(method: str, bad: list[dict[str, str]]) -> RpcError:
    """The invalid_params error for a method's params and their violations."""
    return RpcError("invalid_params", f"{method}: {bad[0]['path']}: {bad[0]['reason']}", violations=bad[:32])


def response(rpc_id: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "id": rpc_id, "result": result}


def error_response(rpc_id: Any, err: RpcError) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "id": rpc_id, "error": err.to_error()}


def notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "method": method, "params": params}


# One encoder for every line: json.dumps with options builds a new encoder per call.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_string = json.encoder.encode_basestring  # what that encoder writes a str as (C)
_CHUNK_KEYS = ("request_id", "seq", "text", "tokens")


def encode_line(msg: dict[str, Any]) -> bytes:
    """One protocol line: compact JSON, UTF-8, newline-terminated.

    A plain generate.chunk (no logprobs) — one per row per step, the hot path — is
    written by hand, byte for byte what the encoder writes (tested), at a fifth of
    the cost of walking the nested dicts.
    """
    p = msg.get("params")
    if (
        type(p) is dict
        and tuple(msg) == ("jsonrpc", "method", "params")
        and msg["jsonrpc"] == JSONRPC
        and msg["method"] == "generate.chunk"
        and tuple(p) == _CHUNK_KEYS
    ):
        rid, seq, text, tokens = p["request_id"], p["seq"], p["text"], p["tokens"]
        if type(rid) is str and type(text) is str and type(seq) is int and type(tokens) is int:
            return (
                f'{{"jsonrpc":"2.0","method":"generate.chunk","params":{{"request_id":{_string(rid)},'
                f'"seq":{seq},"text":{_string(text)},"tokens":{tokens}}}}}\n'
            ).encode()
    return (_encode(msg) + "\n").encode("utf-8")


class Writer:
    """Writes protocol lines to the real stdout. One lock, so lines never interleave."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        self._write(encode_line(msg))

    def send_many(self, msgs: list[dict[str, Any]]) -> None:
        """Several lines, in order, in one write and one flush (the engine's output of
        one decode step: a chunk per row that has new text, and the rows that ended)."""
        if msgs:
            self._write(b"".join(encode_line(m) for m in msgs))

    def _write(self, data: bytes) -> None:
        with self._lock:
            try:
                # An unbuffered stream may write part of a large block: write the rest.
                view = memoryview(data)
                while view:
                    n = self._stream.write(view)
                    view = view[n if n is not None else len(view) :]
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                # The worker closed our stdout: nobody can hear us any more.
                log.error("stdout closed; exiting")
                os._exit(1)

    def close(self) -> None:
        with self._lock:
            try:
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                pass


def take_stdout() -> BinaryIO:
    """Reserve the process's stdout for protocol lines.

    Returns a stream on a duplicate of fd 1 and points fd 1 (and sys.stdout) at stderr,
    so stray prints from libraries, Python or C, land in the log instead of the pipe.
    """
    import sys

    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "wb", buffering=0)
