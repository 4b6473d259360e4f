"""Validate runtime messages against schemas/runtime.*.json (the shared contract)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import jsonschema

from . import schema_bounds as schema_bounds_mod


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
    if type_name == "runtime.generate.params":
        deep = depth_violations(doc)
        if deep:
            # Only these: a message about the deep value (a failed oneOf quotes the
            # whole document) would recurse as deep as it nests.
            return deep
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


@functools.cache
def schema_bounds() -> tuple[int, int, int, int]:
    """How deep a generate's json_schema and each tool's parameters may nest (local
    $refs followed), and how many $refs, patterns and JSON values they may hold
    together: x-max-depth, x-max-refs, x-max-patterns and x-max-nodes of json_schema
    in runtime.generate.params.json (Go: schemas.MaxSchemaDepth, MaxSchemaRefs,
    MaxSchemaPatterns, MaxSchemaNodes, kept equal by a Go test)."""
    schema = json.loads((schemas_dir() / "runtime.generate.params.json").read_text())
    js = schema["properties"]["json_schema"]
    return int(js["x-max-depth"]), int(js["x-max-refs"]), int(js["x-max-patterns"]), int(js["x-max-nodes"])


def max_schema_depth() -> int:
    return schema_bounds()[0]


def depth_violations(params: Any) -> list[dict[str, str]]:
    """The json_schema and tools[i].function.parameters of a generate's params past
    schema_bounds(): too deep with refs followed (llguidance's compiler recursed once
    per level and overflowed its native stack; Python's own JSON and repr recurse per
    level too), or with too many $refs, patterns or values (a compile ran for
    minutes; an enum of 300,000 values took a runtime to 1.16 GB). See
    schema_bounds.py."""
    return schema_bounds_mod.violations(params, *schema_bounds())


def first_violation(type_name: str, doc: Any) -> dict[str, str] | None:
    """The first violation only: cheap on huge documents, since validation stops there."""
    if type_name == "runtime.generate.params":
        deep = depth_violations(doc)
        if deep:
            return deep[0]
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
