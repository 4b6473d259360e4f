"""Bounds on a generate's JSON Schemas past what JSON Schema can say (the Python half
of schemas/depth.go; the numbers are runtime.generate.params.json's x-max-depth,
x-max-refs, x-max-patterns and x-max-nodes, kept equal to Go's constants by a Go
test).

llguidance's grammar compiler recurses natively once per level of nesting, local
$refs included, and some keywords cost far more than their size: a flat $defs chain
of 950 objects each referencing the next (JSON depth 5) overflowed its stack and
killed the process with SIGSEGV, and 500 patternProperties compiled for 73 s. Each
schema is walked with local refs followed: a ref's target sits one level below the
object holding the ref, and a ref back to a target already on the path is recursion
(legal, a tree of nodes) and counts no further. Every other ref followed counts its
target's refs and patterns again (llguidance compiles a target anew per allOf holding
a ref to it); the root's $defs count only where refs reach them. Every JSON value
(object, list, scalar) counts one node, the root's $defs where they sit as well as at
each ref: a 0.95 MB {"enum":[{},{},...]} (about 300,000 values) passed the other
bounds and took a runtime from 146 MB to 1.16 GB, its compile running for minutes
(red team round 11).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote


class _Counts:
    """$refs, patterns and nodes of one generate's schemas, all fields together
    (tools and json_schema compile into one grammar)."""

    def __init__(self) -> None:
        self.refs = 0
        self.patterns = 0
        self.nodes = 0


def _sat(a: int, b: int, limit: int) -> int:
    """a+b, or limit+1 once that passes limit: a DAG whose counts double per level
    never grows a count past its bound."""
    s = a + b
    return s if s <= limit else limit + 1


# A subtree's tally: (height, refs, patterns, nodes), every $ref in it expanded (the ref
# counts one and its target's counts are added again). llguidance compiles a ref's
# target anew for each allOf holding the ref (red team round 9: 20 allOfs each with a
# $ref to one def of 64 patternProperties compiled for 24 s while the target counted
# once), so a target counts at every ref followed.
_NONE = (0, 0, 0, 0)
_SCALAR = (0, 0, 0, 1)


class _Walker:
    def __init__(self, root: Any, max_depth: int, max_refs: int, max_patterns: int, max_nodes: int) -> None:
        self.root = root
        self.max_depth = max_depth
        self.max_refs = max_refs
        self.max_patterns = max_patterns
        self.max_nodes = max_nodes
        self.too_deep = False
        self.too_many = ""  # "refs", "patterns" or "nodes": one subtree alone passed that bound
        self.visits = 0  # nodes walked, for the DAG test
        # The tally of each dict walked from a ref, by id (the document is alive for
        # the whole walk), so a DAG of refs costs linear time, not 2^n. A tally
        # memoized while a cycle was cut may undercount a longer path met later by
        # another entry; the ref count bound and the compile thread's large stack
        # cover that slack.
        self.memo: dict[int, tuple[int, int, int, int]] | None = None
        self.on_path: set[int] = set()
        self.anchors: dict[str, Any] | None = None

    def stopped(self) -> bool:
        return self.too_deep or bool(self.too_many)

    def over(self, refs: int, patterns: int, nodes: int) -> bool:
        """Whether the walk has stopped, setting too_many when one subtree's counts
        pass a bound (the whole schema's then do too)."""
        if self.stopped():
            return True
        if refs > self.max_refs:
            self.too_many = "refs"
        elif patterns > self.max_patterns:
            self.too_many = "patterns"
        elif nodes > self.max_nodes:
            self.too_many = "nodes"
        else:
            return False
        return True

    def height(self, v: Any, depth: int, in_place: bool) -> tuple[int, int, int, int]:
        """v's tally, v sitting at level depth: its height is 0 for a scalar, 1 + its
        deepest child for a dict or list, a ref's target counting as a child of the
        dict holding it. Stops, setting too_deep, once a level passes max_depth, so it
        recurses at most that deep, and, setting too_many, once a subtree's refs,
        patterns or nodes pass their bound (an enum of a million members costs
        max_nodes steps). in_place: v is walked where it sits (not through a
        ref), and the memo is not consulted."""
        self.visits += 1
        if isinstance(v, dict):
            if depth > self.max_depth:
                self.too_deep = True
                return _NONE
            key = None
            if not in_place and self.memo is not None:
                key = id(v)
                t = self.memo.get(key)
                if t is not None:
                    if depth + t[0] - 1 > self.max_depth:
                        self.too_deep = True
                    return t
            mr, mp, mn = self.max_refs, self.max_patterns, self.max_nodes
            h = refs = patterns = 0
            nodes = 1
            ref = v.get("$ref")
            if isinstance(ref, str):
                refs = 1
            pp = v.get("patternProperties")
            if isinstance(pp, dict):
                patterns = _sat(patterns, len(pp), mp)
            if isinstance(v.get("propertyNames"), dict):
                patterns = _sat(patterns, 1, mp)
            if isinstance(v.get("pattern"), str):
                patterns = _sat(patterns, 1, mp)
            if isinstance(ref, str):
                h, r, p, n = self.follow(ref, depth + 1)
                refs, patterns, nodes = _sat(refs, r, mr), _sat(patterns, p, mp), _sat(nodes, n, mn)
            for k in sorted(v):  # Go's order (see sortedKeys in schemas/depth.go)
                e = v[k]
                if self.over(refs, patterns, nodes):
                    return _NONE
                if not isinstance(e, (dict, list)):
                    nodes = _sat(nodes, 1, mn)
                    continue
                if depth == 1 and in_place and k in ("$defs", "definitions") and isinstance(e, dict):
                    # The defs' values count in place too: they are decoded, held and
                    # parsed whether or not a ref reaches them.
                    dh, dn = self.defs_height(e, depth + 1)
                    h, nodes = max(h, dh), _sat(nodes, dn, mn)
                    continue
                c, r, p, n = self.height(e, depth + 1, in_place)
                h = max(h, c)
                refs, patterns, nodes = _sat(refs, r, mr), _sat(patterns, p, mp), _sat(nodes, n, mn)
            if self.over(refs, patterns, nodes):
                return _NONE
            t = (1 + h, refs, patterns, nodes)
            if key is not None:
                self.memo[key] = t
            return t
        if isinstance(v, list):
            if depth > self.max_depth:
                self.too_deep = True
                return _NONE
            h = refs = patterns = 0
            nodes = 1
            for e in v:
                if self.over(refs, patterns, nodes):
                    return _NONE
                if isinstance(e, (dict, list)):
                    c, r, p, n = self.height(e, depth + 1, in_place)
                    h = max(h, c)
                    refs, patterns = _sat(refs, r, self.max_refs), _sat(patterns, p, self.max_patterns)
                    nodes = _sat(nodes, n, self.max_nodes)
                else:
                    nodes = _sat(nodes, 1, self.max_nodes)
            if self.over(refs, patterns, nodes):
                return _NONE
            return (1 + h, refs, patterns, nodes)
        return _SCALAR

    def defs_height(self, defs: dict, depth: int) -> tuple[int, int]:
        """The height of the root's definitions (at level depth) and their nodes in
        place. Their refs and patterns count where refs reach them, not in place (else
        a chain of n defs each referencing the next would count n^2/2 refs); each is
        still walked, for depth and for one past a count's bound alone. Their nodes
        count in place as well as at each ref."""
        self.visits += 1
        if depth > self.max_depth:
            self.too_deep = True
            return 0, 0
        h, n = 0, 1
        for k in sorted(defs):
            d = defs[k]
            if self.stopped() or self.over(0, 0, n):
                return 0, 0
            c, r, p, dn = self.height(d, depth + 1, True)
            self.over(r, p, dn)
            h = max(h, c)
            n = _sat(n, dn, self.max_nodes)
        return 1 + h, n

    def follow(self, ref: str, depth: int) -> tuple[int, int, int, int]:
        """The tally of ref's target placed at level depth: nothing when it is not in
        this document or already on the path (recursion)."""
        target = self.resolve(ref)
        if not isinstance(target, dict):
            return self.height(target, depth, False)  # a list or scalar: no ref of its own
        if self.memo is None:
            self.memo = {}
        key = id(target)
        if key in self.on_path:
            return _NONE
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
            for k in sorted(v):
                self._collect_anchors(v[k], depth + 1)
        elif isinstance(v, list):
            for e in v:
                self._collect_anchors(e, depth + 1)


def violations(
    params: Any, max_depth: int, max_refs: int, max_patterns: int, max_nodes: int
) -> list[dict[str, str]]:
    """A violation for json_schema and each tools[i].function.parameters of a
    generate's params past a bound; the counts run over json_schema then the tools in
    order, and the field where one passes its bound is reported."""
    if not isinstance(params, dict):
        return []
    counts = _Counts()
    out = []

    def check(path: str, schema: Any) -> None:
        w = _Walker(schema, max_depth, max_refs, max_patterns, max_nodes)
        _, r, p, n = w.height(schema, 1, True)
        counts.refs = _sat(counts.refs, r, max_refs)
        counts.patterns = _sat(counts.patterns, p, max_patterns)
        counts.nodes = _sat(counts.nodes, n, max_nodes)
        if w.too_deep:
            reason = f"nests objects and arrays more than {max_depth} levels deep (local $refs followed)"
        elif w.too_many == "refs" or counts.refs > max_refs:
            reason = (
                f"has more than {max_refs} $refs (json_schema and every tool's parameters together, "
                "each $ref's target counted again at every $ref to it)"
            )
        elif w.too_many == "patterns" or counts.patterns > max_patterns:
            reason = (
                f"has more than {max_patterns} patterns (patternProperties entries, propertyNames and "
                "pattern keywords; json_schema and every tool's parameters together, each $ref's target "
                "counted again at every $ref to it)"
            )
        elif w.too_many == "nodes" or counts.nodes > max_nodes:
            reason = (
                f"has more than {max_nodes} values (objects, arrays and scalars; json_schema and every "
                "tool's parameters together, each $ref's target counted again at every $ref to it)"
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
