"""Rewrite a JSON Schema into an equivalent one that more constrained-decoding backends enforce exactly.

Each rewrite keeps the set of accepted instances identical (as ``jsonschema`` judges it, without a
format checker). Where equivalence cannot be proven the subschema stays as it was, so the keyword
check in `schema_support` still rejects it with its pointer. Why these rewrites: outlines_core fails
on subschemas without a type and on unknown formats, llguidance refuses ``oneOf`` and
``dependencies``, outlines_core and xgrammar drop ``required`` keys that ``properties`` does not
declare (``../shared/notes/outlines-facts.md``). Recursive: call it after `check_limits` has
bounded the depth. No torch or Outlines import, so the router can call it.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

from serve_app.constraints.drafts import expanded_size, needs_draft06_bounds, pointers_hold, schema_draft, walk_schema
from serve_app.constraints.keywords import (
    VALIDATION_KEYWORDS,
    map_subschemas,
    resolve_pointer,
)
from serve_app.constraints.schema_facts import (
    ALL_TYPES,
    TYPE_NAMES,
    admits_nothing,
    admitted_types,
    disjoint_schemas,
    evaluated_properties,
    excluded_values,
    finite_domain,
    is_name_list,
    is_never,
    json_equal,
    type_list,
    union_of,
)

_DRAFT_NAMES = {4: "draft-04", 6: "draft-06", 7: "draft-07", 2019: "2019-09", 2020: "2020-12"}
_DRAFT_07_URI = "http://json-schema.org/draft-07/schema#"
# A keyword validates only in drafts [since, until]; elsewhere it is an annotation.
_SINCE = {"const": 6, "contains": 6, "propertyNames": 6, "if": 7, "then": 7, "else": 7, "dependentRequired": 2019,
          "dependentSchemas": 2019, "unevaluatedItems": 2019, "unevaluatedProperties": 2019, "minContains": 2019,
          "maxContains": 2019, "prefixItems": 2020}
_UNTIL = {"dependencies": 7, "additionalItems": 2019}
# Keywords that apply subschemas to the instance itself, so they also decide what counts as "evaluated".
_IN_PLACE = frozenset({"allOf", "anyOf", "oneOf", "not", "if", "then", "else", "$ref", "dependentSchemas"})
_ITEM_KEYWORDS = frozenset({"items", "prefixItems", "additionalItems", "contains"})
_UNEVALUATED = frozenset({"unevaluatedProperties", "unevaluatedItems"})
_COUNTS = frozenset({"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
                     "minContains", "maxContains"})
# Keywords that read each other: merging two schemas may not bring them together from both sides.
_GROUPS = (frozenset({"properties", "patternProperties", "additionalProperties", "unevaluatedProperties"}),
           _ITEM_KEYWORDS | {"unevaluatedItems", "minContains", "maxContains"}, frozenset({"if", "then", "else"}),
           frozenset({"minimum", "exclusiveMinimum"}), frozenset({"maximum", "exclusiveMaximum"}))
_ROOT_KEYS = ("$schema", "$id", "id", "x-guidance")
# A oneOf of overlapping branches is rewritten with each branch's complement (n x n subschemas) up to this many.
MAX_EXCLUSIVE_BRANCHES = 8


@dataclass(frozen=True)
class Normalized:
    schema: dict[str, Any]
    rewrites: tuple[str, ...]  # one line each, naming the pointer where it applied ($refs followed from the root)


def normalize_schema(schema: dict[str, Any], known_formats: frozenset[str], max_nodes: int = 10_000) -> Normalized:
    """`schema` rewritten to accept exactly the same instances; unchanged where its $refs cannot be followed
    safely (remote, anchors, nested $id, dynamic refs) or its $schema is not draft-04/06/07/2019-09/2020-12."""
    root = copy.deepcopy(schema)
    draft = schema_draft(root)
    if draft is None or not all(pointers_hold(root, node, draft) for node in walk_schema(root)):
        return Normalized(root, ())
    rewriter = _Rewriter(root, draft, known_formats, max_nodes)
    body = rewriter.schema(root, "", frozenset())
    body = body if isinstance(body, dict) else {"not": {}}
    out = {**{key: root[key] for key in _ROOT_KEYS if key in root}, **body}
    if rewriter.upgrade:
        out["$schema"] = _DRAFT_07_URI
        rewriter.note("$schema", "", "draft-04 -> draft-07 (for numeric exclusive bounds; no integer type)")
    if rewriter.defs:
        out[rewriter.defs_key] = rewriter.defs
    return Normalized(out, tuple(dict.fromkeys(rewriter.rewrites)))


class _Rewriter:
    def __init__(self, root: dict[str, Any], draft: int, known_formats: frozenset[str], max_nodes: int) -> None:
        self.root, self.draft, self.formats, self.max_nodes = root, draft, known_formats, max_nodes
        self.upgrade = draft == 4 and needs_draft06_bounds(root)
        self.never: Any = False if draft >= 6 or self.upgrade else {"not": {}}
        self.defs_key = "$defs" if draft >= 2019 else "definitions"
        self.uneval_anywhere = draft >= 2019 and any("unevaluatedProperties" in node for node in walk_schema(root))
        self.rewrites: list[str] = []
        self.nodes = 0
        self.kept: dict[str, str] = {}  # $ref -> name of its rewritten target in the output's defs
        self.defs: dict[str, Any] = {}
        self.ref_types: dict[str, frozenset[str]] = {}  # kept $ref -> JSON types its target's `type` allows
        self.sizes: dict[str, int] = {}
        self.proofs: dict[str, str | None] = {}  # oneOf branches -> why they are disjoint

    def note(self, subject: str, ptr: str, outcome: str) -> None:
        self.rewrites.append(f"{subject} at #{ptr or '/'} {outcome}")

    def schema(self, node: Any, ptr: str, active: frozenset[str]) -> Any:
        """`node` rewritten; `active` holds the $refs being inlined on the way here (recursion)."""
        if node is True:
            self.note("true", ptr, "-> {}")
            return {}
        if not isinstance(node, dict):
            return node
        self.nodes += 1
        ref = node.get("$ref")
        if isinstance(ref, str):
            siblings = {k: v for k, v in node.items() if k in VALIDATION_KEYWORDS and k != "$ref"}
            if not siblings or self.draft <= 7:
                if siblings:
                    self.note("keywords next to $ref", ptr, f"dropped (ignored in {_DRAFT_NAMES[self.draft]})")
                return self.ref(ref, ptr, active)
            node = {**siblings, "allOf": [*siblings.get("allOf", []), {"$ref": ref}]}
        node = self.drop_inert({k: v for k, v in node.items() if k not in ("$defs", "definitions", "$anchor")
                                and not (k == "$id" and ptr)}, ptr)  # every $ref here is resolved or rewritten
        return self.simplify(self.children(node, ptr, active), ptr)

    def ref(self, ref: str, ptr: str, active: frozenset[str]) -> Any:
        if ref == "#" or ref in active or not self.fits(ref):
            why = "recursive" if ref == "#" or ref in active else "inlining would pass max_nodes"
            kept = self.keep(ref)
            self.note(f"$ref {ref}", ptr, f"kept as {kept} ({why})")
            return {"$ref": kept}
        self.note(f"$ref {ref}", ptr, "inlined")
        return self.schema(resolve_pointer(self.root, ref), ptr, active | {ref})

    def fits(self, ref: str) -> bool:
        if ref not in self.sizes:  # the budget left only shrinks, so a size counted up to it stays valid
            self.sizes[ref] = expanded_size(self.root, ref, self.max_nodes - self.nodes)
        return self.nodes + self.sizes[ref] <= self.max_nodes

    def keep(self, ref: str) -> str:
        """A pointer, valid in the output, to the rewritten target of `ref` (the root stays "#")."""
        if ref in self.kept:
            return self.kept[ref]
        target = resolve_pointer(self.root, ref)
        declared = isinstance(target, dict) and "$ref" not in target and "type" in target
        token = ref.rsplit("/", 1)[-1].replace("~1", "/").replace("~0", "~")
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", token) or "def"
        candidates = [base] + [f"{base}_{n}" for n in range(2, len(self.defs) + 3)]  # one is always free
        name = next(candidate for candidate in candidates if candidate not in self.defs)
        pointer = self.kept[ref] = "#" if ref == "#" else f"#/{self.defs_key}/{name}"
        self.ref_types[pointer] = admitted_types({"type": target["type"]}, {}) if declared else ALL_TYPES
        if ref != "#":
            self.defs[name] = {}  # reserved before rewriting, as the target may refer to itself
            self.defs[name] = self.schema(target, pointer[1:], frozenset({ref}))
        return pointer

    def children(self, node: dict[str, Any], ptr: str, active: frozenset[str]) -> dict[str, Any]:
        return {key: map_subschemas(key, value, ptr, lambda sub, where: self.schema(sub, where, active))
                for key, value in node.items()}

    def drop_inert(self, node: dict[str, Any], ptr: str) -> dict[str, Any]:
        """Without keywords that validate nothing in this draft or next to these siblings."""
        draft = self.draft
        inert = {k for k in VALIDATION_KEYWORDS & node.keys() if not _SINCE.get(k, 0) <= draft <= _UNTIL.get(k, 2020)}
        for needed, dependents in (("if", {"then", "else"}), ("contains", {"minContains", "maxContains"})):
            inert |= node.keys() & dependents if needed not in node else set()
        if not isinstance(node.get("items"), list):
            inert |= node.keys() & {"additionalItems"}
        for key in sorted(inert):
            self.note(key, ptr, f"dropped (validates nothing here in {_DRAFT_NAMES[self.draft]})")
        return {k: v for k, v in node.items() if k not in inert}

    def simplify(self, node: dict[str, Any], ptr: str) -> Any:
        """The per-subschema rewrites, its children already rewritten."""
        node = self.bounds(self.unique_items(self.drop_format(self.integral_counts(node, ptr), ptr), ptr), ptr)
        if _requires_the_impossible(node):
            self.note("required", ptr, "-> rejects everything (an object that must hold a property no value fits)")
            return self.never
        why = admits_nothing(node, admitted_types(node, self.ref_types))
        if why is not None:
            self.note(why.split(" ", 1)[0], ptr, f"-> rejects everything ({why})")
            return self.never
        if node.get("not") == {}:
            if node != self.never:
                self.note("not: {}", ptr, f"-> {json.dumps(self.never)} (rejects everything)")
            return self.never
        if "not" in node and is_never(node["not"]):
            self.note("not", ptr, "dropped (its subschema rejects everything)")
            node = {k: v for k, v in node.items() if k != "not"}
        if not self.uneval_anywhere:  # these add in-place applicators, which would change what is "evaluated"
            node = self.conditional(self.negation(node, ptr), ptr)
            if node is self.never or node == self.never:
                return self.never
        node = self.all_of(self.one_of(node, ptr), ptr)
        if is_never(node):
            return self.never
        node = self.all_of(self.dependencies(self.unevaluated(node, ptr), ptr), ptr)
        if is_never(node):
            return self.never
        node = self.declare_required(node, ptr)
        if not VALIDATION_KEYWORDS & node.keys():
            if node:
                self.note("annotation-only subschema", ptr, "-> {} (any value)")
            return {}
        return node

    def negation(self, node: dict[str, Any], ptr: str) -> Any:
        """`not` over what has an exact complement: a finite set of values beside it, `not`, `required`,
        `type`, or a property discriminator (see `complement`)."""
        sub = node.get("not")
        if not isinstance(sub, dict):
            return node
        rest = {k: v for k, v in node.items() if k != "not"}
        excluded = excluded_values(sub)
        if excluded is not None:
            domain = finite_domain(rest)
            if domain is None:
                return node
            kept = [v for v in domain if not any(json_equal(v, x) for x in excluded)]
            self.note("not const/enum", ptr, f"-> enum of the {len(kept)} other allowed values")
            if not kept:
                return self.never
            without = {k: v for k, v in rest.items() if k not in ("const", "enum")}
            return {**without, "enum": kept}
        complement = self.complement(sub, rest)
        if complement is None:
            return node
        self.note("not", ptr, "-> its complement")
        return {**rest, "allOf": [*rest.get("allOf", []), complement]}

    def complement(self, sub: Any, beside: dict[str, Any] | None = None) -> Any:
        """A schema accepting exactly what `sub` rejects, or None. `beside`: the schema `sub` is applied
        next to (its property enums bound a discriminator's other values)."""
        if is_never(sub):
            return {}
        if not isinstance(sub, dict):
            return self.never if sub is True else None
        sub = _without_declared_anything(sub)
        keys = VALIDATION_KEYWORDS & sub.keys()
        if not keys:
            return self.never
        if keys == {"not"}:
            return sub["not"]
        if keys == {"required"} and is_name_list(sub["required"]) and sub["required"]:
            absent = [{"properties": {name: self.never}} for name in dict.fromkeys(sub["required"])]
            return {"type": "object", **(absent[0] if len(absent) == 1 else {"anyOf": absent})}
        if keys == {"type"}:
            return self.other_types(sub["type"])
        if keys in ({"anyOf"}, {"allOf"}) and isinstance(sub[next(iter(keys))], list) and sub[next(iter(keys))]:
            # De Morgan: not any of them = each one's complement; not all of them = some one's complement
            parts = [self.complement(member, beside) for member in sub[next(iter(keys))]]
            if any(part is None for part in parts):
                return None
            return {"allOf" if keys == {"anyOf"} else "anyOf": parts}
        return self.discriminator_complement(sub, keys, beside or {})

    def other_types(self, declared: Any) -> Any:
        names = type_list(declared)
        if not names or not all(isinstance(n, str) and n in TYPE_NAMES for n in names):
            return None
        covered = union_of([frozenset(TYPE_NAMES[n]) for n in names])
        if "integer" in covered and "fraction" not in covered:
            return None  # "a number that is not an integer" has no type name
        others = [t for t in ("null", "boolean", "object", "array", "string", "number") if not TYPE_NAMES[t] & covered]
        return self.never if not others else {"type": others[0] if len(others) == 1 else others}

    def discriminator_complement(self, sub: dict[str, Any], keys: set[str], beside: dict[str, Any]) -> Any:
        """¬{properties: {k: V}, required: [k]} (a `type: object` allowed) where V lists values and the
        schema beside gives k a finite domain: not an object, or k absent, or k one of the other values."""
        props = sub.get("properties")
        if not keys <= {"properties", "required", "type"} or not isinstance(props, dict) or len(props) != 1:
            return None
        [(name, value)] = props.items()
        if sub.get("required") != [name] or sub.get("type", "object") != "object":
            return None
        excluded = excluded_values(value) if isinstance(value, dict) and VALIDATION_KEYWORDS & value.keys() <= {
            "const", "enum"} else None
        around = beside.get("properties", {}).get(name) if isinstance(beside.get("properties"), dict) else None
        domain = finite_domain(around) if isinstance(around, dict) else None
        if excluded is None or domain is None:
            return None
        others = [v for v in domain if not any(json_equal(v, x) for x in excluded)]
        branches: list[Any] = [{"properties": {name: self.never}}]
        if others:
            branches.append({"required": [name], "properties": {name: {"enum": others}}})
        not_object = self.other_types("object")
        return {"anyOf": [not_object, {"type": "object", "anyOf": branches}]}

    def conditional(self, node: Any, ptr: str) -> Any:
        """if/then/else whose `if` has an exact complement C: anyOf [allOf [if, then], allOf [C, else]]."""
        if not isinstance(node, dict) or "if" not in node or not {"then", "else"} & node.keys():
            return node
        complement = self.complement(node["if"], node)
        if complement is None:
            return node
        rest = {k: v for k, v in node.items() if k not in ("if", "then", "else")}
        then, otherwise = node.get("then", {}), node.get("else", {})
        branches = [{"allOf": [node["if"], then]}, {"allOf": [complement, otherwise]}]
        self.note("if/then/else", ptr, "-> anyOf [if and then, not-if and else]")
        if "anyOf" in rest:
            return {**rest, "allOf": [*rest.get("allOf", []), {"anyOf": branches}]}
        return {**rest, "anyOf": branches}

    def drop_format(self, node: dict[str, Any], ptr: str) -> dict[str, Any]:
        fmt = node.get("format")
        if not isinstance(fmt, str) or fmt in self.formats:
            return node
        self.note(f"format {fmt!r}", ptr, "dropped (an unknown format is an annotation)")
        return {k: v for k, v in node.items() if k != "format"}

    def integral_counts(self, node: dict[str, Any], ptr: str) -> dict[str, Any]:
        """Counts written as integral floats (`maxItems: 2.0`, an integer in JSON Schema's data model)
        as integers, which backends require."""
        floats = [k for k in _COUNTS & node.keys() if isinstance(node[k], float) and node[k].is_integer()]
        for key in sorted(floats):
            self.note(f"{key}: {node[key]!r}", ptr, f"-> {int(node[key])}")
        return {**node, **{k: int(node[k]) for k in floats}} if floats else node

    def unique_items(self, node: dict[str, Any], ptr: str) -> dict[str, Any]:
        unique, most = node.get("uniqueItems"), node.get("maxItems")
        short = isinstance(most, (int, float)) and not isinstance(most, bool) and most <= 1
        if unique is False or (unique is True and short):
            self.note(f"uniqueItems: {json.dumps(unique)}", ptr, "dropped (always satisfied)")
            return {k: v for k, v in node.items() if k != "uniqueItems"}
        return node

    def bounds(self, node: dict[str, Any], ptr: str) -> dict[str, Any]:
        """Draft-04 boolean exclusive bounds: dropped where they change nothing, else numeric (draft-06 form)."""
        if self.draft != 4:
            return node
        node = dict(node)
        for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            value = node.get(flag)
            if not isinstance(value, bool):
                continue
            if not value or bound not in node:
                self.note(f"{flag}: {json.dumps(node.pop(flag))}", ptr, "dropped (has no effect)")
            elif self.upgrade:
                node[flag] = node.pop(bound)
                self.note(f"{flag}: true", ptr, f"-> {flag}: {node[flag]} (draft-06 form)")
        return node

    def one_of(self, node: dict[str, Any], ptr: str) -> dict[str, Any]:
        branches = node.get("oneOf")
        if not isinstance(branches, list) or not branches:
            return node
        rest = {k: v for k, v in node.items() if k != "oneOf"}
        if len(branches) == 1:
            self.note("oneOf with one branch", ptr, "-> allOf")
            return {**rest, "allOf": [*rest.get("allOf", []), branches[0]]}
        reason = self.disjoint_branches(branches, admitted_types(rest, self.ref_types))
        if reason is None:
            return self.exclusive_one_of(node, rest, branches, ptr)
        self.note("oneOf", ptr, f"-> anyOf (branches disjoint: {reason})")
        if "anyOf" in rest:
            return {**rest, "allOf": [*rest.get("allOf", []), {"anyOf": branches}]}
        return {**rest, "anyOf": branches}

    def exclusive_one_of(self, node: dict[str, Any], rest: dict[str, Any], branches: list[Any],
                         ptr: str) -> dict[str, Any]:
        """Overlapping branches whose every branch has an exact complement C: exactly one holds, so
        anyOf over i of allOf [branch i, C(every other branch)] (e.g. oneOf [required a, required b])."""
        if len(branches) > MAX_EXCLUSIVE_BRANCHES or self.uneval_anywhere:
            return node
        complements = [self.complement(branch, rest) for branch in branches]
        if any(c is None for c in complements):
            return node
        exclusive = [{"allOf": [branch, *(c for j, c in enumerate(complements) if j != i)]}
                     for i, branch in enumerate(branches)]
        self.note("oneOf", ptr, "-> anyOf of each branch without the others (their complements)")
        if "anyOf" in rest:
            return {**rest, "allOf": [*rest.get("allOf", []), {"anyOf": exclusive}]}
        return {**rest, "anyOf": exclusive}

    def disjoint_branches(self, branches: list[Any], within: frozenset[str]) -> str | None:
        """`disjoint_schemas`, remembered across inlined copies; unproven past max_nodes pairs (bounded work)."""
        if len(branches) * (len(branches) - 1) // 2 > self.max_nodes:
            return None
        key = json.dumps([sorted(within), branches], sort_keys=True, default=repr)
        if key not in self.proofs:
            self.proofs[key] = disjoint_schemas(branches, within, self.ref_types)
        return self.proofs[key]

    def all_of(self, node: dict[str, Any], ptr: str) -> Any:
        """Without members that accept anything, and a single member merged where no keyword clashes;
        `never` where a member rejects everything."""
        members = node.get("allOf")
        if not isinstance(members, list):
            return node
        rest = {k: v for k, v in node.items() if k != "allOf"}
        if any(is_never(member) for member in members):  # `false`, or a $ref to it
            self.note("allOf", ptr, "-> rejects everything (a member rejects everything)")
            return self.never
        kept = [member for member in members if member != {} and member is not True]
        if len(kept) == 1 and set(kept[0]) == {"$ref"} and VALIDATION_KEYWORDS & rest.keys() == {"type"} \
                and kept[0]["$ref"] in self.ref_types and self.ref_types[kept[0]["$ref"]] <= admitted_types(rest, {}):
            # {"type": "object", "allOf": [{"$ref": <an object schema>}]}: the type adds nothing, and
            # llguidance refuses a recursive $ref with sibling keywords.
            self.note("type next to $ref", ptr, "dropped (the $ref's target already implies it)")
            return dict(kept[0])
        merged = _merge(rest, kept[0]) if len(kept) == 1 else rest if not kept else None
        if merged is not None:
            self.note("allOf", ptr, "merged into its parent" if kept else "dropped (its members accept anything)")
            return merged
        return node if len(kept) == len(members) else {**rest, "allOf": kept}

    def unevaluated(self, node: dict[str, Any], ptr: str) -> dict[str, Any]:
        """unevaluatedX is additionalX where no in-place applicator evaluates anything; beside `allOf`
        members (they always apply), unevaluatedProperties is additionalProperties over every property
        they and the node declare."""
        in_place = (_IN_PLACE | {"$dynamicRef", "$recursiveRef"}) & node.keys()
        members = evaluated_properties(node.get("allOf", [])) if in_place <= {"allOf", "not"} else None
        if in_place and (members is None or "unevaluatedProperties" not in node):
            return node
        names, patterns, everything = members or (set(), set(), False)
        node = dict(node)
        if "unevaluatedProperties" in node:
            value = node.pop("unevaluatedProperties")
            covered = everything or "additionalProperties" in node
            if not covered:
                node["properties"] = {**{name: {} for name in sorted(names)}, **node.get("properties", {})}
                node["patternProperties"] = {**{p: {} for p in sorted(patterns)}, **node.get("patternProperties", {})}
                node = {k: v for k, v in node.items() if v != {} or k not in ("properties", "patternProperties")}
                node["additionalProperties"] = value
            self.note("unevaluatedProperties", ptr, "dropped (additionalProperties evaluates every property)"
                      if covered else "-> additionalProperties" + (" (with what allOf declares)" if in_place else ""))
        if in_place:
            return node
        if "unevaluatedItems" in node and "contains" not in node:  # (contains evaluates the items it matches)
            rest = "additionalItems" if isinstance(node.get("items"), list) else "items"  # after a tuple form
            covered = rest in node
            node.setdefault(rest, node.pop("unevaluatedItems"))
            self.note("unevaluatedItems", ptr, f"dropped ({rest} evaluates every item)" if covered else f"-> {rest}")
        return node

    def dependencies(self, node: dict[str, Any], ptr: str) -> dict[str, Any]:
        """dependentRequired (and draft-07 dependencies) as allOf of anyOf [property absent, dependency holds]."""
        key = "dependencies" if self.draft <= 7 else "dependentRequired"
        deps = node.get(key)
        if not isinstance(deps, dict) or not all(
                is_name_list(d) or key == "dependencies" and isinstance(d, (dict, bool)) for d in deps.values()):
            return node
        clauses = [{"anyOf": [{"properties": {name: self.never}},
                              {"required": list(dict.fromkeys([name, *dep]))} if isinstance(dep, list) else dep]}
                   for name, dep in deps.items() if dep not in ([], {})]
        self.note(key, ptr, "-> allOf of anyOf [property absent, dependency holds]")
        rest = {k: v for k, v in node.items() if k != key}
        return {**rest, "allOf": [*rest.get("allOf", []), *clauses]} if clauses else rest

    def declare_required(self, node: dict[str, Any], ptr: str) -> dict[str, Any]:
        """Required names missing from properties, declared with the schema they get anyway."""
        required, props, extra = node.get("required", []), node.get("properties", {}), node.get("additionalProperties")
        if (not is_name_list(required) or not isinstance(props, dict) or node.get("patternProperties")
                or self.uneval_anywhere or is_never(extra)):
            return node
        missing = [name for name in required if name not in props]
        if not missing:
            return node
        value = {} if extra is None or extra is True else extra
        self.note(f"required {', '.join(map(repr, missing))}", ptr, "declared in properties")
        return {**node, "properties": {**props, **{name: copy.deepcopy(value) for name in missing}}}


def _merge(parent: dict[str, Any], branch: Any) -> dict[str, Any] | None:
    """`parent` and `branch` as one schema, or None where their keywords would clash or read each other."""
    if not isinstance(branch, dict):
        return None
    ours, theirs = VALIDATION_KEYWORDS & parent.keys(), VALIDATION_KEYWORDS & branch.keys()
    if ours and theirs and (ours & theirs or "$ref" in ours | theirs or _UNEVALUATED & theirs
                            or any(ours & group and theirs & group for group in _GROUPS)):
        return None
    return {**branch, **parent}


def _without_declared_anything(sub: dict[str, Any]) -> dict[str, Any]:
    """`sub` without `properties` that only declare required names as any value (declare_required adds
    them; they validate nothing)."""
    props = sub.get("properties")
    if isinstance(props, dict) and props and all(v in ({}, True) for v in props.values()) \
            and is_name_list(sub.get("required")) and set(props) <= set(sub["required"]):
        return {k: v for k, v in sub.items() if k != "properties"}
    return sub


def _requires_the_impossible(node: dict[str, Any]) -> bool:
    """Only objects, one of whose required properties rejects every value."""
    properties, required = node.get("properties"), node.get("required")
    if node.get("type") not in ("object", ["object"]) or not isinstance(properties, dict) \
            or not isinstance(required, list):
        return False
    return any(isinstance(name, str) and name in properties and is_never(properties[name]) for name in required)


def exact_complement(sub: Any, beside: dict[str, Any]) -> Any:
    """What `sub` rejects next to `beside` (a property `beside` requires, `sub` requires too), or None."""
    props, needed = sub.get("properties") if isinstance(sub, dict) else None, beside.get("required") or []
    if isinstance(props, dict) and "required" not in sub and is_name_list(needed) and props.keys() <= {*needed}:
        sub = {**sub, "required": list(props)}
    return _Rewriter({}, 2020, frozenset(), 0).complement(sub, beside)  # (in draft 2020-12's spelling)
