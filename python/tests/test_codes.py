"""The runtime's error codes come from schemas/codes/errors.json, the list Go names in
schemas/codes.go (its TestCodesMatchFile checks the Go side); here every code the
runtime's source raises must be one of them, with the number Go decodes it by."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import SCHEMAS

from mlx_serving_runtime import protocol

SOURCE = Path(protocol.__file__).resolve().parent
# RpcError("code", ...) and code = "a" if ... else "b" (a code picked before raising).
RAISED = re.compile(r'RpcError\(\s*"([a-z_]+)"|\bcode\s*=\s*("[a-z_]+".*)')


def codes_file() -> list[dict]:
    return json.loads((SCHEMAS / "codes" / "errors.json").read_text())["codes"]


def test_error_codes_are_the_files() -> None:
    want = {c["code"]: c["rpc"] for c in codes_file() if "rpc" in c}
    assert protocol.ERROR_CODES == want


def test_every_raised_code_is_listed() -> None:
    seen = set()
    for path in sorted(SOURCE.glob("*.py")):
        for m in RAISED.finditer(path.read_text()):
            found = [m.group(1)] if m.group(1) else re.findall(r'"([a-z_]+)"', m.group(2))
            for code in found:
                assert code in protocol.ERROR_CODES, f"{path.name} raises {code!r}, not in codes/errors.json"
                seen.add(code)
    # The scan must find the runtime's raises, or it checks nothing.
    assert {"model_not_loaded", "out_of_memory", "shutting_down"} <= seen, seen


def test_runtime_codes_say_who_sends_them() -> None:
    for c in codes_file():
        assert ("rpc" in c) == ("runtime" in c["senders"]), c["code"]
