"""Every runtime vector in schemas/testdata runs through the same schemas the runtime loads."""

from __future__ import annotations

import json

import jsonschema
import pytest
from conftest import SCHEMAS

from mlx_serving_runtime import validation

VECTORS = sorted(SCHEMAS.glob("testdata/runtime.*/*/*.json"))


def test_every_runtime_type_has_vectors() -> None:
    types = validation.types()
    assert len(types) >= 20
    for t in types:
        d = SCHEMAS / "testdata" / t
        assert len(list((d / "valid").glob("*.json"))) >= 2, t
        assert len(list((d / "invalid").glob("*.json"))) >= 5, t


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.stem}")
def test_vector(path) -> None:
    doc = json.loads(path.read_text())
    if path.parent.name == "valid":
        assert validation.violations(path.parent.parent.name, doc) == []
    else:
        # The first violation is enough, and stops early on the deliberately huge vectors.
        bad = validation.first_violation(path.parent.parent.name, doc)
        assert bad is not None, "invalid vector passes its schema"
        assert bad["path"].startswith("$") and bad["reason"]


@pytest.mark.parametrize("path", sorted(SCHEMAS.glob("runtime.*.json")), ids=lambda p: p.stem)
def test_schema_is_strict_draft7(path) -> None:
    schema = json.loads(path.read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)

    def walk(node, where):
        if isinstance(node, dict):
            assert "$ref" not in node, where
            if "properties" in node:
                assert node.get("additionalProperties") is False, where
                for k, sub in node["properties"].items():
                    assert sub.get("description"), f"{where}.{k} has no description"
            for k, v in node.items():
                walk(v, f"{where}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(schema, path.stem)


def test_violation_paths_match_go_convention() -> None:
    bad = validation.violations("runtime.generate.params", {"request_id": "r", "prompt": "x", "stop": [1]})
    paths = {v["path"] for v in bad}
    assert "$.model" in paths  # a missing property is reported where it belongs
    assert "$.stop[0]" in paths
