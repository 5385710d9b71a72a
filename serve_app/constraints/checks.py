"""Keywords no grammar expresses, enforced while generating: `not`, `oneOf` whose branches may
overlap, `uniqueItems`, `if`/`then`/`else`, `contains`, `dependentRequired`/`dependencies`,
`dependentSchemas`.

Planning (`split_checks`) takes them out of what the backend compiles (`oneOf` becomes `anyOf`,
the others go), which leaves a looser grammar, and keeps the schema with them as the one the
checks read. While a row generates, `RowChecker` scans its JSON text as it grows and, at the
close of every value, validates that value against the checked keywords of every subschema
that applies at its location (and, in an array with `uniqueItems`, against the items before
it). A token whose text would close a value that fails is not kept: the decode loop bans it
at that position and samples again, and when nothing is left there it rolls the row back a
token (never before the start of the value that failed), a depth-first search bounded by
`CHECK_BUDGET`. A row that spends its budget ends (`length`) and is reported, never valid.

Where a location is reached through `anyOf` branches, the checks of every branch apply: that
can only refuse more, never accept an invalid output. The full jsonschema validation after
generation still decides `valid`. No torch import: the router plans with this.
"""

from __future__ import annotations

import bisect
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from serve_app.cache import BoundedCache
from serve_app.constraints.keywords import (
    CHECKED_KEYWORDS,
    COUNT_KEYWORDS,
    escape_pointer,
    iter_subschemas,
    map_subschemas,
    resolve_pointer,
)
from serve_app.constraints.validation import ENFORCED_FORMATS, regex_search, safe_validator
from serve_app.errors import ConstraintError

# Banned tokens (each a resample, or a rollback of one token) one row may spend on checks.
CHECK_BUDGET = 64
# A value refused this many times (a duplicate item at once) is written again from an earlier token.
ESCALATE_AFTER = 4
# Every regex a check runs has this limit (it runs in the decode loop, as closing's do): undecided fails.
PATTERN_TIMEOUT_S = 0.01
# Subschemas one location may expand to (anyOf branches, $refs, allOf parts); beyond, the rest are not checked.
MAX_APPLICABLE = 512
_CACHED_LOCATIONS = 4096


@dataclass(frozen=True)
class Split:
    grammar: dict[str, Any]  # what the backends compile
    sites: tuple[str, ...]  # "keyword at #/pointer", one per checked keyword


def has_checked_keywords(schema: dict[str, Any]) -> bool:
    return any(_checked(k, sub) for _, sub in iter_subschemas(schema) for k in sub)


def _checked(key: str, node: dict[str, Any]) -> bool:
    """Whether `key` of `node` leaves the grammar for the checks."""
    if key in COUNT_KEYWORDS:
        properties = node.get("properties")
        required = node.get("required")
        listed = set(required) if isinstance(required, list) else set()
        return isinstance(properties, dict) and bool(properties) and not set(properties) <= listed
    return key in CHECKED_KEYWORDS and not (key == "uniqueItems" and node[key] is not True)


def split_checks(schema: dict[str, Any]) -> Split:
    """The schema without its checked keywords (`oneOf` as `anyOf`), and where they were."""
    sites: list[str] = []

    def strip(node: Any, ptr: str) -> Any:
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in CHECKED_KEYWORDS or _checked(key, node):
                if _checked(key, node) and key not in ("then", "else", "minContains", "maxContains"):
                    sites.append(f"{key} at #{ptr or '/'}")
                continue
            out[key] = map_subschemas(key, value, ptr, strip)
        if isinstance(node.get("oneOf"), list):  # an instance matches at least one branch: the grammar's part
            branches = [strip(b, f"{ptr}/oneOf/{i}") for i, b in enumerate(node["oneOf"])]
            if "anyOf" in out:
                out["allOf"] = [*out.get("allOf", []), {"anyOf": branches}]
            else:
                out["anyOf"] = branches
        return out

    return Split(strip(schema, ""), tuple(dict.fromkeys(sites)))


class Location(NamedTuple):
    checks: tuple[Any, ...]  # validators of the checked keywords of each subschema that applies
    unique: bool  # an array whose items must differ
    names: tuple[Any, ...] = ()  # validators of propertyNames: each key of an object here
    max_properties: int | None = None  # the fewest maxProperties that applies here

    @property
    def watched(self) -> bool:
        return bool(self.checks or self.names) or self.max_properties is not None


class ValueChecks:
    """The checks of one schema by instance location, shared by every row that uses it."""

    def __init__(self, schema: dict[str, Any], sites: tuple[str, ...]) -> None:
        self.root = schema
        self.sites = sites
        self._validator = safe_validator(schema, PATTERN_TIMEOUT_S, ENFORCED_FORMATS)
        # Keyed by id(): each entry holds its subschema, which keeps the id from being reused.
        self._fragments: BoundedCache[int, tuple[Any, Any]] = BoundedCache(_CACHED_LOCATIONS)
        self._locations: BoundedCache[tuple[Any, ...], Location] = BoundedCache(_CACHED_LOCATIONS)
        self._tuple_items = max((len(sub[k]) for _, sub in iter_subschemas(schema) for k in ("prefixItems", "items")
                                 if isinstance(sub.get(k), list)), default=0)

    def at(self, path: tuple[Any, ...]) -> Location:
        # Items past the longest tuple form (prefixItems, items as a list) all follow the same subschemas.
        path = tuple(min(p, self._tuple_items) if isinstance(p, int) else p for p in path)
        found = self._locations.get(path)
        if found is not None:
            return found
        schemas = self._expand([self.root])
        for segment in path:
            schemas = self._expand(self._child(schemas, segment))
        checks, names, unique, most = [], [], False, None
        for node in schemas:
            unique = unique or node.get("uniqueItems") is True
            validator = self._fragment(node)
            if validator is not None:
                checks.append(validator)
            if isinstance(node.get("propertyNames"), (dict, bool)):
                names.append(self._validator.evolve(schema=node["propertyNames"]))
            limit = node.get("maxProperties")
            if isinstance(limit, int) and not isinstance(limit, bool):
                most = limit if most is None else min(most, limit)
        found = Location(tuple(checks), unique, tuple(names), most)
        self._locations.put(path, found)
        return found

    def _fragment(self, node: dict[str, Any]) -> Any:
        known = self._fragments.get(id(node))
        if known is not None and known[0] is node:
            return known[1]
        keys = [k for k in (*CHECKED_KEYWORDS, *COUNT_KEYWORDS)
                if k in node and k not in ("uniqueItems", "propertyNames")]
        if "if" not in node:
            keys = [k for k in keys if k not in ("then", "else")]
        fragment = {k: node[k] for k in keys}
        validator = self._validator.evolve(schema=fragment) if fragment else None
        self._fragments.put(id(node), (node, validator))
        return validator

    def _expand(self, schemas: list[Any]) -> list[dict[str, Any]]:
        """The subschemas that apply in place: through $ref, allOf/anyOf/oneOf, then/else, dependent schemas."""
        out: list[dict[str, Any]] = []
        stack, seen = list(reversed(schemas)), set()
        while stack and len(out) < MAX_APPLICABLE:
            node = stack.pop()
            if not isinstance(node, dict) or id(node) in seen:
                continue
            seen.add(id(node))
            out.append(node)
            ref = node.get("$ref")
            if isinstance(ref, str):
                with contextlib.suppress(ConstraintError):
                    stack.append(resolve_pointer(self.root, ref))
            for key in ("allOf", "anyOf", "oneOf"):
                if isinstance(node.get(key), list):
                    stack.extend(reversed(node[key]))
            stack.extend(node[key] for key in ("then", "else") if key in node)
            for key in ("dependentSchemas", "dependencies"):
                if isinstance(node.get(key), dict):
                    stack.extend(v for v in node[key].values() if isinstance(v, dict))
        return out

    def _child(self, schemas: list[dict[str, Any]], segment: Any) -> list[Any]:
        out: list[Any] = []
        for node in schemas:
            if isinstance(segment, str):
                matched = False
                properties = node.get("properties")
                if isinstance(properties, dict) and segment in properties:
                    out.append(properties[segment])
                    matched = True
                patterns = node.get("patternProperties")
                for pattern, sub in (patterns.items() if isinstance(patterns, dict) else ()):
                    if regex_search(pattern, segment, PATTERN_TIMEOUT_S):
                        out.append(sub)
                        matched = True
                if not matched and isinstance(node.get("additionalProperties"), dict):
                    out.append(node["additionalProperties"])
                continue
            prefix, items = node.get("prefixItems"), node.get("items")
            if isinstance(items, list):  # draft-04..2019 tuple form
                prefix, items = items, node.get("additionalItems")
            if isinstance(prefix, list) and segment < len(prefix):
                out.append(prefix[segment])
            elif isinstance(items, dict):
                out.append(items)
        return out


class Violation(NamedTuple):
    what: str
    start_token: int  # where the failing value's parent starts (its own start at the root): rollbacks stop there
    children: tuple[int, ...] = ()  # where its and its siblings' members start: where to write it again from
    value_token: int = -1  # the token holding the failing value's first character (inside a string's quote)
    duplicate: bool = False


class _Frame(NamedTuple):
    kind: str  # "object" | "array"
    path: tuple[Any, ...]
    start: int  # character offset of its bracket
    start_token: int
    state: str
    key: Any
    items: int  # values read so far (an array's next index)
    seen: tuple[str, ...] | None  # canonical items so far, in an array with uniqueItems
    watched: bool  # checked when it closes (or an item of a uniqueItems array)
    starts: tuple[int, ...] = ()  # the output token where each key or item begins


class _Scalar(NamedTuple):
    kind: str  # "string" | "key" | "number" | "literal"
    start: int
    start_token: int
    escape: bool


class ScanState(NamedTuple):
    frames: tuple[_Frame, ...] = ()
    scalar: _Scalar | None = None
    pos: int = 0  # characters scanned
    done: bool = False  # the root value closed
    broken: bool = False  # not JSON this scanner follows: no more checks (the final validation still runs)


_NUMBER = frozenset("0123456789+-.eE")
_SPACE = frozenset(" \t\n\r")


@dataclass
class CheckStats:
    evaluated: int = 0  # values checked at their close
    violations: int = 0  # closes refused (a banned token each)
    rollbacks: int = 0  # tokens taken back
    exhausted: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"evaluated": self.evaluated, "violations": self.violations, "rollbacks": self.rollbacks,
                "exhausted": self.exhausted}


@dataclass
class RowChecker:
    """One row's scan of its output, the tokens banned at each position, and what it spent."""

    checks: ValueChecks
    states: list[ScanState] = field(default_factory=lambda: [ScanState()])  # after each output token
    text: str = ""  # the output text the last state scanned
    bans: dict[int, set[int]] = field(default_factory=dict)  # output position -> tokens refused there
    stats: CheckStats = field(default_factory=CheckStats)
    spent: int = 0
    violation: Violation | None = None  # the last refusal's
    failures: dict[int, int] = field(default_factory=dict)  # refusals by rollback floor
    escalations: dict[int, int] = field(default_factory=dict)  # rewrites by the failing value's first token
    ends: list[int] = field(default_factory=lambda: [0])  # characters scanned after each output token
    _trial: tuple[str, ScanState] | None = None

    # -- while sampling --------------------------------------------------------------------------

    def trial(self, text: str, final: bool = False) -> Violation | None:
        """Whether output text `text` (the current output and one more token) closes a value that
        fails a check; the scan is kept for `commit`. `final`: the output ends here (EOS)."""
        token = len(self.states) - 1
        if text.startswith(self.text):
            state, check_from = self.states[-1], len(self.text)
        else:  # decoding is not always prefix-stable (a character split across tokens): resume before it
            check_from = _common_prefix(text, self.text)
            state = self.states[bisect.bisect_right(self.ends, check_from) - 1]
        found: list[Violation] = []
        state = self._scan(state, text, token, check_from, found)
        if final and not found:
            state = self._end(state, text, token, check_from, found)
        self._trial = (text, state)
        return found[0] if found else None

    def commit(self, text: str) -> None:
        """The token was kept and the output is now `text`."""
        if self._trial is not None and self._trial[0] == text:
            state = self._trial[1]
        else:
            state = self.states[-1] if text.startswith(self.text) else \
                self.states[bisect.bisect_right(self.ends, _common_prefix(text, self.text)) - 1]
            state = self._scan(state, text, len(self.states) - 1, len(text), [])
        self.states.append(state)
        self.ends.append(state.pos)
        self.text, self._trial = text, None

    def refuse(self, position: int, *tokens: int) -> bool:
        """Ban `tokens` at output position `position`; False when the budget is spent."""
        self._trial = None
        if self.spent >= CHECK_BUDGET:
            self.stats.exhausted = True
            return False
        self.spent += 1
        self.bans.setdefault(position, set()).update(tokens)
        return True

    def rewrite_bans(self, target: int, output: list[int]) -> list[int]:
        """What to ban where a failing value is written again from `target`: the token there and, for a
        duplicate item, the first token of every item before it (each would likely start the same value)."""
        violation = self.violation
        banned = [output[target]]
        if violation is not None and violation.duplicate:
            banned += [output[t] for t in violation.children if t < target]
        return banned

    def rewind(self, tokens_left: int, text: str) -> None:
        """The output was cut back to `tokens_left` tokens reading `text`; bans past it no longer apply."""
        self.stats.rollbacks += len(self.states) - 1 - tokens_left
        del self.states[tokens_left + 1:]
        del self.ends[tokens_left + 1:]
        self.bans = {p: b for p, b in self.bans.items() if p <= tokens_left}
        self.failures = {p: n for p, n in self.failures.items() if p <= tokens_left}
        self.escalations = {p: n for p, n in self.escalations.items() if p <= tokens_left}
        self.text, self._trial = text, None

    @property
    def rollback_floor(self) -> int:
        return self.violation.start_token if self.violation is not None else 0

    def escalation(self, position: int) -> int | None:
        """After a refusal at output position `position`: the output token to write the failing value
        again from (its first token there is banned), or None to ban only the refused token and sample
        again. A duplicate item is rewritten at once, another value after ESCALATE_AFTER refusals:
        from its first character, then from its siblings' (the latest first), then from its parent's start."""
        violation = self.violation
        assert violation is not None
        floor = violation.start_token
        self.failures[floor] = refused = self.failures.get(floor, 0) + 1
        if not violation.duplicate and refused % ESCALATE_AFTER:
            return None
        targets = sorted({t for t in (violation.value_token, *violation.children) if floor <= t < position},
                         reverse=True)
        if floor < position and floor not in targets:
            targets.append(floor)
        if not targets:
            return None
        here = max(violation.value_token, floor)  # the same value refused again goes further back
        self.escalations[here] = step = self.escalations.get(here, 0) + 1
        return targets[min(step, len(targets)) - 1]

    def banned(self, position: int) -> set[int]:
        return self.bans.get(position, set())

    def floor(self) -> int:
        """The first output token a rollback may take back: the start of the parent of the outermost
        open value that a check will read (the output's length when there is none)."""
        state = self.states[-1]
        frames = state.frames
        starts = [frames[max(0, d - 1)].start_token for d, f in enumerate(frames) if f.watched]
        if state.scalar is not None and state.scalar.kind != "key" and self._scalar_watched(state):
            starts.append(frames[-1].start_token if frames else state.scalar.start_token)
        return min(starts, default=len(self.states) - 1)

    def settled_chars(self) -> int:
        """Characters of output no rollback can change (what a stream may send)."""
        return self.states[self.floor()].pos if self.floor() < len(self.states) else len(self.text)

    # -- scanning --------------------------------------------------------------------------------

    def _scalar_watched(self, state: ScanState) -> bool:
        parent = state.frames[-1] if state.frames else None
        path = _child_path(parent) if parent is not None else ()
        return bool(self.checks.at(path).checks) or (parent is not None and parent.seen is not None)

    def _scan(self, state: ScanState, text: str, token: int, check_from: int, found: list[Violation]) -> ScanState:
        if state.broken or state.done and not state.frames:
            return state._replace(pos=len(text))
        frames, scalar, done = list(state.frames), state.scalar, state.done
        i = state.pos
        n = len(text)
        while i < n and not found:
            c = text[i]
            if scalar is not None:
                kind = scalar.kind
                if kind in ("string", "key"):
                    if scalar.escape:
                        scalar = scalar._replace(escape=False)
                    elif c == "\\":
                        scalar = scalar._replace(escape=True)
                    elif c == '"':
                        start, scalar_token, scalar = scalar.start, scalar.start_token, None
                        if kind == "key":
                            top = frames[-1]
                            try:
                                key = json.loads(text[start:i + 1])
                            except ValueError:
                                return ScanState(broken=True, pos=n)
                            frames[-1] = top._replace(state="colon", key=key)
                            if top.watched and i >= check_from:
                                self._key_closed(top, key, scalar_token, found)
                        else:
                            self._closed(frames, text, start, i + 1, scalar_token, check_from, found, token)
                            done = done or not frames
                    i += 1
                    continue
                if (kind == "number" and c in _NUMBER) or (kind == "literal" and c.isalpha()):
                    i += 1
                    continue
                start, scalar_token, scalar = scalar.start, scalar.start_token, None
                self._closed(frames, text, start, i, scalar_token, check_from, found, token, at=i)
                done = done or not frames
                if found:
                    break
                continue  # c is read again as structure
            if c in _SPACE:
                i += 1
                continue
            if not frames:
                if done:
                    return ScanState(broken=True, pos=n)
                scalar = self._open(frames, c, i, token, ())
                if scalar is False:
                    return ScanState(broken=True, pos=n)
                i += 1
                continue
            top = frames[-1]
            if top.kind == "object":
                if c == '"' and top.state in ("key_or_end", "key"):
                    scalar = _Scalar("key", i, self._token_of(i), False)
                    # A member is written again from its name's first character (its quote often
                    # shares a token with the comma or brace before it).
                    named = self._token_of(i + 1) if i + 1 < n else len(self.ends)
                    frames[-1] = top._replace(items=top.items + 1, starts=top.starts + (named,))
                    most = self.checks.at(top.path).max_properties if top.watched else None
                    if most is not None and top.items >= most and i >= check_from:
                        self.stats.evaluated += 1
                        found.append(Violation(f"maxProperties: a property past {most} at "
                                               f"{_pointer(top.path)}", top.start_token, top.starts))
                        break
                elif c == "}" and top.state in ("key_or_end", "after"):
                    frames.pop()
                    self._closed(frames, text, top.start, i + 1, top.start_token, check_from, found, token,
                                 closing=top)
                    done = done or not frames
                elif c == ":" and top.state == "colon":
                    frames[-1] = top._replace(state="value")
                elif c == "," and top.state == "after":
                    frames[-1] = top._replace(state="key")
                elif top.state == "value":
                    frames[-1] = top._replace(state="after")
                    scalar = self._open(frames, c, i, token, top.path + (top.key,), parent_index=len(frames) - 1)
                else:
                    return ScanState(broken=True, pos=n)
            else:
                if c == "]" and top.state in ("value_or_end", "after"):
                    frames.pop()
                    self._closed(frames, text, top.start, i + 1, top.start_token, check_from, found, token,
                                 closing=top)
                    done = done or not frames
                elif c == "," and top.state == "after":
                    frames[-1] = top._replace(state="value")
                elif top.state in ("value_or_end", "value"):
                    first = i + 1 if c == '"' else i  # an item is written again from its first character
                    frames[-1] = top._replace(state="after", items=top.items + 1,
                                              starts=top.starts + (self._token_of(first) if first < n else
                                                                   len(self.ends),))
                    scalar = self._open(frames, c, i, token, top.path + (top.items,), parent_index=len(frames) - 1)
                else:
                    return ScanState(broken=True, pos=n)
            if scalar is False:
                return ScanState(broken=True, pos=n)
            i += 1
        return ScanState(tuple(frames), scalar, n if not found else i, done)

    def _open(self, frames: list[_Frame], c: str, i: int, token: int, path: tuple[Any, ...],
              parent_index: int | None = None) -> Any:
        """Start a value at character `c`: push a container, or return the scalar begun (False: not JSON)."""
        parent = frames[parent_index] if parent_index is not None else None
        in_unique = parent is not None and parent.seen is not None
        token = self._token_of(i)
        if c in "{[":
            location = self.checks.at(path)
            kind = "object" if c == "{" else "array"
            frames.append(_Frame(kind, path, i, token, "key_or_end" if kind == "object" else "value_or_end", None, 0,
                                 () if kind == "array" and location.unique else None,
                                 location.watched or in_unique))
            return None
        if c == '"':
            return _Scalar("string", i, token, False)
        if c == "-" or c.isdigit():
            return _Scalar("number", i, token, False)
        if c in "tfn":
            return _Scalar("literal", i, token, False)
        return False

    def _key_closed(self, frame: _Frame, key: str, start_token: int, found: list[Violation]) -> None:
        names = self.checks.at(frame.path).names
        if not names:
            return
        self.stats.evaluated += 1
        for validator in names:
            try:
                ok = validator.is_valid(key)
            except Exception:  # noqa: BLE001 - undecided (a slow pattern): not proven valid
                ok = False
            if not ok:
                found.append(Violation(f"propertyNames: {key!r} at {_pointer(frame.path)}", frame.start_token,
                                       frame.starts))
                return

    def _token_of(self, char: int) -> int:
        """The output token whose text holds character `char` (the token being tried, past the scan)."""
        return bisect.bisect_right(self.ends, char) - 1 if char < self.ends[-1] else len(self.ends) - 1

    def _closed(self, frames: list[_Frame], text: str, start: int, end: int, start_token: int, check_from: int,
                found: list[Violation], token: int, closing: _Frame | None = None, at: int = -1) -> None:
        """A value spanning text[start:end] closed (seen at character `at` when that is after it: the delimiter
        after a number); `frames` holds its ancestors (the parent last)."""
        parent = frames[-1] if frames else None
        path = closing.path if closing is not None else (_child_path(parent) if parent is not None else ())
        location = self.checks.at(path)
        unique = parent is not None and parent.seen is not None
        if not location.checks and not unique:
            return
        try:
            value = json.loads(text[start:end])
        except ValueError:
            return  # the matcher decides what is JSON; an unparsable value is left to the final validation
        canonical = _canonical(value) if unique else ""
        if max(end - 1, at) >= check_from:  # decided by this token's text: checked now
            self.stats.evaluated += 1
            where = _pointer(path)
            # Rollbacks may rewrite the value's siblings too (a duplicate of an earlier item; a token
            # the grammar forces, shared with the end of the member before): back to its parent's start.
            floor = parent.start_token if parent is not None else start_token
            members = tuple(sorted({*(parent.starts if parent is not None else ()),
                                    *(closing.starts if closing is not None else ())}))
            first = self._token_of(start + 1) if text[start] == '"' else start_token
            if unique and canonical in (parent.seen or ()):  # type: ignore[union-attr]
                found.append(Violation(f"uniqueItems: a duplicate item at {where}", floor, members, first, True))
                return
            for validator in location.checks:
                try:
                    ok = validator.is_valid(value)
                except Exception:  # noqa: BLE001 - undecided (a slow pattern): not proven valid
                    ok = False
                if not ok:
                    found.append(Violation(f"a checked keyword fails at {where}", floor, members, first))
                    return
        if unique:
            frames[-1] = parent._replace(seen=parent.seen + (canonical,))  # type: ignore[union-attr,operator]

    def _end(self, state: ScanState, text: str, token: int, check_from: int, found: list[Violation]) -> ScanState:
        """EOS: a root number or literal closes here."""
        if state.broken or state.frames or state.scalar is None or state.scalar.kind not in ("number", "literal"):
            return state
        frames: list[_Frame] = []
        self._closed(frames, text, state.scalar.start, len(text), state.scalar.start_token, check_from, found, token,
                     at=len(text))
        return ScanState((), None, len(text), True)


def _pointer(path: tuple[Any, ...]) -> str:
    return "/" + "/".join(escape_pointer(str(p)) for p in path)


def _child_path(parent: _Frame) -> tuple[Any, ...]:
    """The path of the value being read inside `parent` (its state already moved past it)."""
    if parent.kind == "object":
        return parent.path + (parent.key,)
    return parent.path + (parent.items - 1,)


def _canonical(value: Any) -> str:
    """JSON Schema equality as a string: 1 and 1.0 are equal, key order does not count, true is not 1."""
    def norm(v: Any) -> Any:
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v
    return json.dumps(norm(value), sort_keys=True)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
