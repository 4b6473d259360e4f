"""Bounds on a generate's JSON Schemas past what JSON Schema can say (the Python half
of schemas/depth.go; the numbers are runtime.generate.params.json's x-max-depth,
x-max-refs and x-max-patterns, kept equal to Go's constants by a Go test).

llguidance's grammar compiler recurses natively once per level of nesting, local
$refs included, and some keywords cost far more than their size: a flat $defs chain
of 950 objects each referencing the next (JSON depth 5) overflowed its stack and
killed the process with SIGSEGV, and 500 patternProperties compiled for 73 s. Each
schema is walked with local refs followed: a ref's target sits one level below the
object holding the ref, and a ref back to a target already on the path is recursion
(legal, a tree of nodes) and counts no further.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote


class _Counts:
    """$refs and patterns of one generate's schemas, all fields together (tools and
    json_schema compile into one grammar)."""

    def __init__(self) -> None:
        self.refs = 0
        self.patterns = 0


class _Walker:
    def __init__(self, root: Any, counts: _Counts, max_depth: int) -> None:
        self.root = root
        self.counts = counts
        self.max_depth = max_depth
        self.too_deep = False
        self.visits = 0  # nodes walked, for the DAG test
        # The height of each dict walked from a ref, by id (the document is alive
        # for the whole walk), so a DAG of refs costs linear time, not 2^n. A height
        # memoized while a cycle was cut may undercount a longer path met later by
        # another entry; the ref count bound and the compile thread's large stack
        # cover that slack.
        self.memo: dict[int, int] | None = None
        self.on_path: set[int] = set()
        self.anchors: dict[str, Any] | None = None

    def height(self, v: Any, depth: int, count: bool) -> int:
        """Levels v nests (0 for a scalar, 1 + its deepest child for a dict or list, a
        ref's target counting as a child of the dict holding it), v sitting at level
        depth. Stops, setting too_deep, once a level passes max_depth, so it recurses
        at most that deep. count: v is walked in place (not through a ref), so its
        refs and patterns are counted, once each whatever refs point at it."""
        self.visits += 1
        if isinstance(v, dict):
            if depth > self.max_depth:
                self.too_deep = True
                return 0
            key = None
            if not count and self.memo is not None:
                key = id(v)
                h = self.memo.get(key)
                if h is not None:
                    if depth + h - 1 > self.max_depth:
                        self.too_deep = True
                    return h
            h = 0
            ref = v.get("$ref")
            if count:
                c = self.counts
                if isinstance(ref, str):
                    c.refs += 1
                pp = v.get("patternProperties")
                if isinstance(pp, dict):
                    c.patterns += len(pp)
                if isinstance(v.get("propertyNames"), dict):
                    c.patterns += 1
                if isinstance(v.get("pattern"), str):
                    c.patterns += 1
            if isinstance(ref, str):
                h = self.follow(ref, depth + 1)
            for e in v.values():
                if self.too_deep:
                    return 0
                if isinstance(e, (dict, list)):
                    h = max(h, self.height(e, depth + 1, count))
            if key is not None:
                self.memo[key] = 1 + h
            return 1 + h
        if isinstance(v, list):
            if depth > self.max_depth:
                self.too_deep = True
                return 0
            h = 0
            for e in v:
                if self.too_deep:
                    return 0
                if isinstance(e, (dict, list)):
                    h = max(h, self.height(e, depth + 1, count))
            return 1 + h
        return 0

    def follow(self, ref: str, depth: int) -> int:
        """The height of ref's target placed at level depth: 0 when it is not in this
        document or already on the path (recursion)."""
        target = self.resolve(ref)
        if not isinstance(target, dict):
            return self.height(target, depth, False)  # a list or scalar: no ref of its own
        if self.memo is None:
            self.memo = {}
        key = id(target)
        if key in self.on_path:
            return 0
        self.on_path.add(key)
        try:
            return self.height(target, depth, False)
        finally:
            self.on_path.discard(key)

    def resolve(self, ref: str) -> Any:
        """A $ref's target in this schema, or None. What precedes "#" is ignored
        (llguidance resolves the schema's own $id into this document, so reading every
        ref as local can only count more): "#" or none is the root, "#/a/b" a JSON
        pointer (percent- and ~0/~1-escaped), "#name" a $anchor."""
        frag = ref.split("#", 1)[1] if "#" in ref else ""
        frag = unquote(frag)
        if not frag:
            return self.root
        if frag[0] != "/":
            if self.anchors is None:
                self.anchors = {}
                self._collect_anchors(self.root, 1)
            return self.anchors.get(frag)
        cur = self.root
        for tok in frag[1:].split("/"):
            tok = tok.replace("~1", "/").replace("~0", "~")
            if isinstance(cur, dict):
                cur = cur.get(tok)
            elif isinstance(cur, list) and tok.isdigit() and int(tok) < len(cur):
                cur = cur[int(tok)]
            else:
                return None
        return cur

    def _collect_anchors(self, v: Any, depth: int) -> None:
        if depth > self.max_depth:
            return  # deeper makes the schema too deep anyway
        if isinstance(v, dict):
            a = v.get("$anchor")
            if isinstance(a, str):
                self.anchors.setdefault(a, v)
            for e in v.values():
                self._collect_anchors(e, depth + 1)
        elif isinstance(v, list):
            for e in v:
                self._collect_anchors(e, depth + 1)


def violations(params: Any, max_depth: int, max_refs: int, max_patterns: int) -> list[dict[str, str]]:
    """A violation for json_schema and each tools[i].function.parameters of a
    generate's params past a bound; the counts run over json_schema then the tools in
    order, and the field where one passes its bound is reported."""
    if not isinstance(params, dict):
        return []
    counts = _Counts()
    out = []

    def check(path: str, schema: Any) -> None:
        w = _Walker(schema, counts, max_depth)
        w.height(schema, 1, True)
        if w.too_deep:
            reason = f"nests objects and arrays more than {max_depth} levels deep (local $refs followed)"
        elif counts.refs > max_refs:
            reason = f"has more than {max_refs} $refs (json_schema and every tool's parameters together)"
        elif counts.patterns > max_patterns:
            reason = (
                f"has more than {max_patterns} patterns (patternProperties entries, propertyNames and "
                "pattern keywords; json_schema and every tool's parameters together)"
            )
        else:
            return
        out.append({"path": path, "reason": reason})

    if "json_schema" in params:
        check("$.json_schema", params["json_schema"])
    tools = params.get("tools")
    for i, t in enumerate(tools if isinstance(tools, list) else []):
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and "parameters" in fn:
            check(f"$.tools[{i}].function.parameters", fn["parameters"])
    return out
