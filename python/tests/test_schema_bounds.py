"""schema_bounds: the Python half of schemas/depth.go (see schemas/schemaref_test.go
for the same cases on the Go side)."""

from __future__ import annotations

import json

from test_compile_bounds import TREE, alias_chain, object_chain, pattern_props

from mlx_serving_runtime import schema_bounds, validation


def reasons(schema) -> list[str]:
    return [v["reason"] for v in validation.depth_violations({"json_schema": schema})]


def test_bounds_read_from_the_schema_file() -> None:
    assert validation.schema_bounds() == (64, 256, 64)


def test_alias_depth_boundary() -> None:
    """n aliases reach level n+3: 61 pass, 62 do not. Mutation caught: a ref hop not
    counted as a level."""
    assert reasons(alias_chain(61)) == []
    assert reasons(alias_chain(62)) == [
        "nests objects and arrays more than 64 levels deep (local $refs followed)"
    ]


def test_pointer_forms_followed() -> None:
    """Percent escapes, ~0/~1, definitions, $anchor and the schema's own $id.
    Mutation caught: ~1 unescaping removed, or anchors not collected."""
    s = json.dumps(object_chain(100))
    forms = {
        "percent": s.replace('"#/$defs/d', '"#/%24defs/d'),
        "id": '{"$id":"http://x/s",' + s[1:].replace('"#/$defs/d', '"http://x/s#/$defs/d'),
        "tilde": s.replace('"#/$defs/d', '"#/definitions/x~1~0d')
        .replace('"$defs"', '"definitions"')
        .replace('{"d0"', '{"x/~d0"')
        .replace(', "d', ', "x/~d'),
    }
    for name, text in forms.items():
        assert len(reasons(json.loads(text))) == 1, name
    anchors = {
        "$defs": {
            f"d{i}": {"$anchor": f"a{i}", "type": "object", "properties": {"a": {"$ref": f"#a{i + 1}"}}}
            for i in range(100)
        },
        "$ref": "#a0",
    }
    anchors["$defs"]["d100"] = {"$anchor": "a100", "type": "string"}
    assert len(reasons(anchors)) == 1


def test_recursion_allowed() -> None:
    for s in (TREE, {"type": "object", "properties": {"next": {"$ref": "#"}}}):
        assert reasons(s) == [], s


def test_dag_walk_is_linear() -> None:
    """Each def referencing the next twice: 2^20 paths and as many refs once expanded
    (refused), yet about a hundred visits (memo per target, counts saturating at their
    bound). Mutation caught: the memo lookup removed."""
    n = 20
    defs = {
        f"d{i}": {
            "type": "object",
            "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}, "b": {"$ref": f"#/$defs/d{i + 1}"}},
        }
        for i in range(n)
    }
    s = {"$defs": {**defs, f"d{n}": {"type": "string"}}, "$ref": "#/$defs/d0"}
    assert len(reasons(s)) == 1 and "more than 256 $refs" in reasons(s)[0]
    w = schema_bounds._Walker(s, 64, 256, 64)
    w.height(s, 1, True)
    assert w.visits < 500, w.visits


def allof_refs(patterns: int, n: int) -> dict:
    """Red team round 9's schema: $defs.P holds `patterns` patternProperties and n
    properties are each an allOf of a $ref to P and a maxProperties (llguidance
    compiles P anew per allOf: 20 over 64 patterns compiled for 24 s)."""
    pp = {f"^([a-z]{{0,12}}[0-9]){{0,12}}z{i}$": {"type": "string"} for i in range(patterns)}
    return {
        "$defs": {"P": {"type": "object", "patternProperties": pp}},
        "type": "object",
        "properties": {
            f"k{j}": {"allOf": [{"$ref": "#/$defs/P"}, {"type": "object", "maxProperties": j + 1}]}
            for j in range(n)
        },
    }


def test_ref_target_counted_per_ref() -> None:
    """A ref's target counts its patterns and refs again at every ref followed to it:
    the red team's schema is refused at 2 refs (128 patterns); a 6-pattern def
    referenced 10 times passes, 11 times not; 2 refs to a def of 200 refs pass 256.
    Mutation caught: follow's tally not added (targets counted once)."""
    assert len(reasons(allof_refs(64, 2))) == 1 and "more than 64 patterns" in reasons(allof_refs(64, 2))[0]
    assert reasons(allof_refs(6, 10)) == []
    assert "more than 64 patterns" in reasons(allof_refs(6, 11))[0]
    refs = {
        "$defs": {
            "s": {"type": "string"},
            "R": {"type": "object", "properties": {f"p{i}": {"$ref": "#/$defs/s"} for i in range(200)}},
        },
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/R"}, "b": {"$ref": "#/$defs/R"}},
    }
    assert "more than 256 $refs" in reasons(refs)[0]


def test_counts_shared_across_fields() -> None:
    """40 patterns in json_schema and 40 in a tool pass alone, not together; refs past
    256 are refused. Mutation caught: a fresh count per field."""
    params = {
        "json_schema": pattern_props(40),
        "tools": [{"type": "function", "function": {"name": "f", "parameters": pattern_props(40)}}],
    }
    got = validation.depth_violations(params)
    assert [v["path"] for v in got] == ["$.tools[0].function.parameters"], got
    refs = {
        "$defs": {"s": {"type": "string"}},
        "type": "object",
        "properties": {f"p{i}": {"$ref": "#/$defs/s"} for i in range(257)},
    }
    assert len(reasons(refs)) == 1 and reasons(refs)[0].startswith(
        "has more than 256 $refs (json_schema and every tool's parameters together"
    )
    assert reasons(object_chain(20)) == []
