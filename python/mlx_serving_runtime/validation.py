"""Validate runtime messages against schemas/runtime.*.json (the shared contract)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import jsonschema


def schemas_dir() -> Path:
    """MLX_SERVING_SCHEMAS; else the copy a released wheel carries inside the package;
    else the repository's schemas/ beside python/ (editable install)."""
    env = os.environ.get("MLX_SERVING_SCHEMAS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    packaged = here / "schemas"
    if any(packaged.glob("runtime.*.json")):
        return packaged
    return here.parent.parent / "schemas"


@functools.cache
def _validators() -> dict[str, jsonschema.Draft7Validator]:
    d = schemas_dir()
    out: dict[str, jsonschema.Draft7Validator] = {}
    for p in sorted(d.glob("runtime.*.json")):
        schema = json.loads(p.read_text())
        jsonschema.Draft7Validator.check_schema(schema)
        out[p.name[: -len(".json")]] = jsonschema.Draft7Validator(schema)
    if not out:
        raise RuntimeError(f"no runtime.*.json schemas in {d} (set MLX_SERVING_SCHEMAS)")
    return out


def types() -> list[str]:
    return sorted(_validators())


def _path(parts: Any) -> str:
    s = "$"
    for p in parts:
        s += f"[{p}]" if isinstance(p, int) else f".{p}"
    return s


def violations(type_name: str, doc: Any) -> list[dict[str, str]]:
    """Every way doc breaks the schema of type_name, as [{path, reason}], sorted by path.

    Paths read "$", "$.a.b[0]"; a missing required property is reported at the property
    it names, like the Go side does.
    """
    v = _validators()[type_name]
    out: list[dict[str, str]] = []
    for e in v.iter_errors(doc):
        parts = list(e.absolute_path)
        if e.validator == "required" and isinstance(e.instance, dict):
            for name in e.validator_value:
                if name not in e.instance and e.message.startswith(repr(name)):
                    parts.append(name)
                    break
        out.append({"path": _path(parts), "reason": e.message[:512]})
    out.sort(key=lambda x: (x["path"], x["reason"]))
    return out


def first_violation(type_name: str, doc: Any) -> dict[str, str] | None:
    """The first violation only: cheap on huge documents, since validation stops there."""
    for e in _validators()[type_name].iter_errors(doc):
        return {"path": _path(e.absolute_path), "reason": e.message[:512]}
    return None


def is_valid(type_name: str, doc: Any) -> bool:
    return _validators()[type_name].is_valid(doc)


@functools.cache
def default_max_tokens() -> int:
    """max_tokens of a generate that names none: runtime.generate.params.json's default
    (declared once there; Go reads the same as schemas.DefaultMaxTokens)."""
    schema = json.loads((schemas_dir() / "runtime.generate.params.json").read_text())
    return int(schema["properties"]["max_tokens"]["default"])
