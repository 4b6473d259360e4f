package schemas

import (
	"fmt"
	"maps"
	"net/url"
	"reflect"
	"slices"
	"strconv"
	"strings"
)

// Bounds on the JSON Schemas a job carries (its json_schema and each of its
// tools' function.parameters), past what JSON Schema itself can say. The
// runtime compiles them into a grammar with llguidance, whose compiler
// recurses natively and, for some keywords, costs far more than the schema's
// size: schemas inside these bounds compile in well under 100 ms, schemas past
// them crashed or wedged the runtime, failing every job on it whoever sent it
// (red team rounds 7 and 8). Validate refuses them at every edge (producer
// client, gateway, dispatcher, worker) as a violation at the field's path;
// job.json and runtime.generate.params.json state them ("x-max-depth",
// "x-max-refs", "x-max-patterns", "x-max-nodes" in the latter, which the Python
// runtime reads;
// TestSchemaBoundsMatchSchemas keeps both files equal to these constants).
const (
	// MaxSchemaDepth bounds how deep a schema nests objects and arrays, with
	// local $refs followed: the value itself is level 1, so {"type":"string"}
	// is 1 level deep and {"items":{"type":"string"}} 2, and a {"$ref": ...}
	// object at level n puts its target at level n+1. A ref to a schema already
	// on the path is recursion (a tree of nodes), legal, and counts no further.
	// A schema a thousand levels deep killed the runtime with RecursionError; a
	// flat $defs chain of 950 objects each referencing the next (JSON depth 5)
	// overflowed llguidance's native stack (SIGSEGV).
	MaxSchemaDepth = 64
	// MaxSchemaRefs bounds the "$ref"s of a job's schemas, all fields together
	// (tools compile into one grammar), a ref's target's refs counted again at
	// every ref followed to it. Compile time grows with them: 256
	// properties each a $ref compiled in 14 ms, 1024 in 109 ms (tiny model,
	// python/mlx_serving_runtime structured.compile_schema, 2-core dev box).
	MaxSchemaRefs = 256
	// MaxSchemaPatterns bounds the regular expressions of a job's schemas, all
	// fields together: each patternProperties entry, each propertyNames and each
	// "pattern" keyword counts one, and a $ref counts its target's patterns
	// again each time it is followed: llguidance compiles a target anew for
	// each allOf holding a ref to it, so 20 such allOfs over one def of 64
	// patternProperties compiled for 24 s while the target counted once (red
	// team round 9). patternProperties compile in time
	// superlinear in the entries of one object: 64 compiled in 25 ms, 100 in
	// 86 ms, 128 in 175 ms, 500 in 73 s (same setup).
	MaxSchemaPatterns = 64
	// MaxSchemaNodes bounds the JSON values of a job's schemas, all fields
	// together: every object, array, string, number, boolean and null in the
	// document counts one (an object's keys are not counted: each has its
	// value), the root's $defs included where they sit, and a $ref's target
	// counted again at every $ref followed to it. Values, not keywords, because
	// values are what costs: decoding one into Go or Python allocates per value
	// (an empty object {} is 3 bytes of JSON and about 270 bytes of Go map), and
	// llguidance's compile walks every value of every subschema it reaches,
	// enum and const members included, once per ref followed to it. A 0.95 MB
	// {"enum":[{},{},...]} (about 300,000 values, depth 2, no refs, no
	// patterns) passed every other bound and took each runtime from 146 MB to
	// 1.16 GB, its compile running for minutes past its 5 s limit (red team
	// round 11). Real structured-output schemas hold tens to a few hundred
	// values (the largest in tests/ and schemas/testdata: about 200); 10,000 is
	// an enum of some thousands of members or a tool set of a hundred rich
	// functions.
	MaxSchemaNodes = 10000
)

// schemaViolations returns a violation for each schema-carrying field of the
// decoded job (or runtime.generate.params) v past the bounds above; the counts
// run over json_schema then tools in order, and the field where a count passes
// its bound is the one reported. It costs two map lookups for a job without
// schemas, and for one with them a walk of each node about twice (once in
// place, once from a $ref to it), whatever shape the refs make.
func schemaViolations(v any) []Violation {
	doc, ok := v.(map[string]any)
	if !ok {
		return nil
	}
	var out []Violation
	var c schemaCounts
	if s, ok := doc["json_schema"]; ok {
		if r := c.check(s); r != "" {
			out = append(out, Violation{Path: "$.json_schema", Reason: r})
		}
	}
	tools, _ := doc["tools"].([]any)
	for i, t := range tools {
		tool, _ := t.(map[string]any)
		fn, _ := tool["function"].(map[string]any)
		if p, ok := fn["parameters"]; ok {
			if r := c.check(p); r != "" {
				out = append(out, Violation{Path: "$.tools[" + strconv.Itoa(i) + "].function.parameters", Reason: r})
			}
		}
	}
	return out
}

// schemaCounts carries the ref, pattern and node counts across a job's fields.
type schemaCounts struct{ refs, patterns, nodes int }

// check walks one schema and returns why it is past a bound, or "".
func (c *schemaCounts) check(root any) string {
	w := schemaWalker{root: root}
	t := w.height(root, 1, true)
	c.refs = satAdd(c.refs, t.refs, MaxSchemaRefs)
	c.patterns = satAdd(c.patterns, t.patterns, MaxSchemaPatterns)
	c.nodes = satAdd(c.nodes, t.nodes, MaxSchemaNodes)
	switch {
	case w.tooDeep:
		return fmt.Sprintf("nests objects and arrays more than %d levels deep (local $refs followed)", MaxSchemaDepth)
	case w.tooMany == "refs" || c.refs > MaxSchemaRefs:
		return fmt.Sprintf("has more than %d $refs (json_schema and every tool's parameters together, each $ref's target counted again at every $ref to it)", MaxSchemaRefs)
	case w.tooMany == "patterns" || c.patterns > MaxSchemaPatterns:
		return fmt.Sprintf("has more than %d patterns (patternProperties entries, propertyNames and pattern keywords; json_schema and every tool's parameters together, each $ref's target counted again at every $ref to it)", MaxSchemaPatterns)
	case w.tooMany == "nodes" || c.nodes > MaxSchemaNodes:
		return fmt.Sprintf("has more than %d values (objects, arrays and scalars; json_schema and every tool's parameters together, each $ref's target counted again at every $ref to it)", MaxSchemaNodes)
	}
	return ""
}

// tally is what a subtree costs llguidance: its height, and its refs,
// patterns and nodes (JSON values) with every $ref in it expanded (the ref counts one, its target's
// counts are added again). llguidance compiles a ref's target anew for each
// allOf holding the ref (red team round 9: 20 allOfs each with a $ref to one
// def of 64 patternProperties, every count inside the bounds when a target
// counted once, compiled for 24 s), so a target counts at every ref followed.
// The counts saturate one past their bound (satAdd): a DAG whose counts
// double per level neither overflows nor costs more than its walk.
type tally struct{ height, refs, patterns, nodes int }

func (t *tally) add(o tally) {
	t.refs = satAdd(t.refs, o.refs, MaxSchemaRefs)
	t.patterns = satAdd(t.patterns, o.patterns, MaxSchemaPatterns)
	t.nodes = satAdd(t.nodes, o.nodes, MaxSchemaNodes)
}

// satAdd is a+b, or limit+1 when that passes limit (a and b are at most
// limit+1 or a single keyword's entry count, so the sum cannot overflow).
func satAdd(a, b, limit int) int {
	if s := a + b; s <= limit {
		return s
	}
	return limit + 1
}

type schemaWalker struct {
	root    any
	tooDeep bool
	tooMany string // "refs", "patterns" or "nodes": one subtree alone passed that bound; the walk stopped
	visits  int    // nodes walked, for TestRefDAGLinear
	// Lazily made, only for schemas with refs. memo: the tally of each object
	// walked from a ref, so a DAG of refs (each def referencing the next twice)
	// costs linear time, not 2^n. onPath: ref targets being walked, whose
	// reappearance below themselves is recursion. A tally memoized while a
	// cycle was cut may undercount a longer path met later through another
	// entry; the ref count bound and the runtime's large compile stack cover
	// that slack.
	// Keys are the maps' addresses: the document is alive (and Go's heap does
	// not move) for the whole walk.
	memo    map[uintptr]tally
	onPath  map[uintptr]bool
	anchors map[string]any
}

func (w *schemaWalker) stopped() bool { return w.tooDeep || w.tooMany != "" }

// height returns v's tally where v sits at level depth: its height is 0 for a
// scalar, 1 + its deepest child for an object or array, a ref's target being
// a child of the object holding the ref. It stops, setting tooDeep, as soon as
// a level passes MaxSchemaDepth, so it recurses at most that deep, and, setting
// tooMany, as soon as a subtree's refs, patterns or nodes pass their bound (so
// an enum of a million members costs the walk MaxSchemaNodes steps). inPlace: v
// is walked where it sits (not through a ref), and the memo is not consulted.
func (w *schemaWalker) height(v any, depth int, inPlace bool) tally {
	w.visits++
	switch x := v.(type) {
	case map[string]any:
		if depth > MaxSchemaDepth {
			w.tooDeep = true
			return tally{}
		}
		var key uintptr
		if !inPlace && w.memo != nil {
			key = reflect.ValueOf(x).Pointer()
			if t, ok := w.memo[key]; ok {
				if depth+t.height-1 > MaxSchemaDepth {
					w.tooDeep = true
				}
				return t
			}
		}
		t := tally{nodes: 1}
		ref, isRef := x["$ref"].(string)
		if isRef {
			t.refs = 1
		}
		if pp, ok := x["patternProperties"].(map[string]any); ok {
			t.patterns = satAdd(t.patterns, len(pp), MaxSchemaPatterns)
		}
		if _, ok := x["propertyNames"].(map[string]any); ok {
			t.patterns = satAdd(t.patterns, 1, MaxSchemaPatterns)
		}
		if _, ok := x["pattern"].(string); ok {
			t.patterns = satAdd(t.patterns, 1, MaxSchemaPatterns)
		}
		if isRef {
			c := w.follow(ref, depth+1)
			t.height = c.height
			t.add(c)
		}
		for _, k := range sortedKeys(x) {
			e := x[k]
			if w.overCount(t) {
				return tally{}
			}
			if defs, ok := e.(map[string]any); ok && depth == 1 && inPlace && (k == "$defs" || k == "definitions") {
				// The defs' values count in place too: they are decoded,
				// held and parsed whether or not a ref reaches them.
				h, n := w.defsHeight(defs, depth+1)
				t.height = max(t.height, h)
				t.nodes = satAdd(t.nodes, n, MaxSchemaNodes)
				continue
			}
			c := w.height(e, depth+1, inPlace)
			t.height = max(t.height, c.height)
			t.add(c)
		}
		if w.overCount(t) {
			return tally{}
		}
		t.height++
		if key != 0 {
			w.memo[key] = t
		}
		return t
	case []any:
		if depth > MaxSchemaDepth {
			w.tooDeep = true
			return tally{}
		}
		t := tally{nodes: 1}
		for _, e := range x {
			if w.overCount(t) {
				return tally{}
			}
			c := w.height(e, depth+1, inPlace)
			t.height = max(t.height, c.height)
			t.add(c)
		}
		if w.overCount(t) {
			return tally{}
		}
		t.height++
		return t
	}
	return tally{nodes: 1} // a scalar
}

// defsHeight returns the height of the root's definitions (at level depth)
// and their nodes in place. Their refs and patterns count where refs reach
// them, not in place (else a chain of n defs each referencing the next would
// count n^2/2 refs); each is still walked, for depth and for one past a
// count's bound alone. Their nodes count in place as well as at each ref.
func (w *schemaWalker) defsHeight(defs map[string]any, depth int) (height, nodes int) {
	w.visits++
	if depth > MaxSchemaDepth {
		w.tooDeep = true
		return 0, 0
	}
	h, n := 0, 1
	for _, k := range sortedKeys(defs) {
		d := defs[k]
		if w.stopped() || w.overCount(tally{nodes: n}) {
			return 0, 0
		}
		c := w.height(d, depth+1, true)
		w.overCount(c)
		h = max(h, c.height)
		n = satAdd(n, c.nodes, MaxSchemaNodes)
	}
	return 1 + h, n
}

// overCount reports whether the walk has stopped, setting tooMany when t alone
// passes a count's bound (the whole schema then does too).
func (w *schemaWalker) overCount(t tally) bool {
	switch {
	case w.stopped():
	case t.refs > MaxSchemaRefs:
		w.tooMany = "refs"
	case t.patterns > MaxSchemaPatterns:
		w.tooMany = "patterns"
	case t.nodes > MaxSchemaNodes:
		w.tooMany = "nodes"
	default:
		return false
	}
	return true
}

// follow returns the tally of ref's target placed at level depth: nothing
// when it is not in this document or is already on the path (recursion).
func (w *schemaWalker) follow(ref string, depth int) tally {
	t := w.resolve(ref)
	target, ok := t.(map[string]any)
	if !ok {
		return w.height(t, depth, false) // an array or a scalar: no ref of its own to loop on
	}
	if w.memo == nil {
		w.memo = map[uintptr]tally{}
		w.onPath = map[uintptr]bool{}
	}
	key := reflect.ValueOf(target).Pointer()
	if w.onPath[key] {
		return tally{}
	}
	w.onPath[key] = true
	h := w.height(target, depth, false)
	delete(w.onPath, key)
	return h
}

// resolve finds a $ref's target in this schema, or nil. Whatever precedes "#"
// is ignored: llguidance resolves a ref naming the schema's own $id (or a
// sibling's) into the same document, so reading every ref as local can only
// count more. "#" or none is the root, "#/a/b" a JSON pointer (percent- and
// ~0/~1-escaped), "#name" a $anchor.
func (w *schemaWalker) resolve(ref string) any {
	frag := ""
	if i := strings.IndexByte(ref, '#'); i >= 0 {
		frag = ref[i+1:]
	}
	if u, err := url.PathUnescape(frag); err == nil {
		frag = u
	}
	if frag == "" {
		return w.root
	}
	if frag[0] != '/' {
		if w.anchors == nil {
			w.anchors = map[string]any{}
			collectAnchors(w.root, w.anchors, 1)
		}
		return w.anchors[frag]
	}
	cur := w.root
	for _, tok := range strings.Split(frag[1:], "/") {
		tok = strings.ReplaceAll(strings.ReplaceAll(tok, "~1", "/"), "~0", "~")
		switch x := cur.(type) {
		case map[string]any:
			cur = x[tok]
		case []any:
			i, err := strconv.Atoi(tok)
			if err != nil || i < 0 || i >= len(x) {
				return nil
			}
			cur = x[i]
		default:
			return nil
		}
	}
	return cur
}

// collectAnchors records each object with "$anchor" under v, down to
// MaxSchemaDepth (deeper ones make the schema too deep anyway).
func collectAnchors(v any, into map[string]any, depth int) {
	if depth > MaxSchemaDepth {
		return
	}
	switch x := v.(type) {
	case map[string]any:
		if a, ok := x["$anchor"].(string); ok {
			if _, dup := into[a]; !dup {
				into[a] = x
			}
		}
		for _, k := range sortedKeys(x) {
			collectAnchors(x[k], into, depth+1)
		}
	case []any:
		for _, e := range x {
			collectAnchors(e, into, depth+1)
		}
	}
}

// sortedKeys is the order the walks take an object's members in. A tally
// memoized while a recursive ref was cut depends on the order refs are met,
// so Go (whose map order is random) and schema_bounds.py (which sorts too)
// must meet them in one order to count a recursive schema alike, and the
// first of two equal $anchors must be the same one.
func sortedKeys(m map[string]any) []string { return slices.Sorted(maps.Keys(m)) }
