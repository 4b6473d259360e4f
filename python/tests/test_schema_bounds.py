"""schema_bounds: the Python half of schemas/depth.go (see schemas/schemaref_test.go
for the same cases on the Go side)."""

from __future__ import annotations

import json

from test_compile_bounds import TREE, alias_chain, object_chain, pattern_props

from mlx_serving_runtime import schema_bounds, validation


def reasons(schema) -> list[str]:
    return [v["reason"] for v in validation.depth_violations({"json_schema": schema})]


def test_bounds_read_from_the_schema_file() -> None:
    assert validation.schema_bounds() == (64, 256, 64, 10000)


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
    w = schema_bounds._Walker(s, 64, 256, 64, 10000)
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


NODES = "has more than 10000 values"


def enum_of(n: int) -> dict:
    """A schema of exactly n JSON values: the dict, the list and n-2 members."""
    return {"enum": [0] * (n - 2)}


def test_node_boundary() -> None:
    """10000 values pass, 10001 do not, scalars and empty objects alike (red team
    round 11's F6: a 0.95 MB enum of {} passed every other bound and took a runtime
    to 1.16 GB). Same cases as schemas/nodes_test.go. Mutation caught: a scalar
    member not counted (the `nodes = _sat(nodes, 1, ...)` of the list loop removed)."""
    assert reasons(enum_of(10000)) == []
    assert reasons(enum_of(10001))[0].startswith(NODES)
    assert reasons({"enum": [{} for _ in range(10000)]})[0].startswith(NODES)


def test_nodes_shared_across_fields() -> None:
    """5000 values in json_schema and 5000 in a tool pass, one more value in a
    second tool is refused there. Mutation caught: counts.nodes not summed."""

    def tool(name: str, n: int) -> dict:
        return {"type": "function", "function": {"name": name, "parameters": enum_of(n)}}

    ok = {"json_schema": enum_of(5000), "tools": [tool("a", 5000)]}
    assert validation.depth_violations(ok) == []
    over = {"json_schema": enum_of(5000), "tools": [tool("a", 5000), tool("b", 2)]}
    got = validation.depth_violations(over)
    assert [v["path"] for v in got] == ["$.tools[1].function.parameters"], got
    assert got[0]["reason"].startswith(NODES)


def test_nodes_defs_in_place_and_per_ref() -> None:
    """Unreferenced $defs count where they sit; a def counts again at each ref (60
    refs to 200 values refused, to 100 allowed). Mutation caught: defs_height's node
    sum dropped, or the follow's nodes not added."""
    assert reasons({"$defs": {"big": enum_of(10000)}, "type": "string"})[0].startswith(NODES)

    def refs(n: int) -> dict:
        props = {f"p{i}": {"$ref": "#/$defs/e"} for i in range(60)}
        return {"$defs": {"e": enum_of(n)}, "type": "object", "properties": props}

    assert reasons(refs(200))[0].startswith(NODES)
    assert reasons(refs(100)) == []


def test_node_walk_stops() -> None:
    """An enum of a million members is refused after about max_nodes members of the
    list loop, not a million. Mutation caught: the over() check in the list loop
    removed (the loop runs to the end)."""
    seen = 0

    class Members(list):
        def __iter__(self):
            nonlocal seen
            for e in super().__iter__():
                seen += 1
                yield e

    s = {"enum": Members([0] * 1_000_000)}
    w = schema_bounds._Walker(s, 64, 256, 64, 10000)
    w.height(s, 1, True)
    assert w.too_many == "nodes"
    assert seen < 10010, seen
