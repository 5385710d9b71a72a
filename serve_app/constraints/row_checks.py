"""One row's checks while it generates (the keywords checks.py takes out of the grammar): its
output scanned token by token with the shared JSON scanner (json_scan.py), each closing value
validated against the checked keywords where it stands, the tokens refused at each position, and
what to write again when a value keeps failing.

A token whose text would close a value that fails is not kept: the decode loop bans it at that
position and samples again, and when nothing is left there it rolls the row back a token (never
before the start of the value that failed), a depth-first search bounded by `CHECK_BUDGET`. A
row that spends its budget ends (`length`) and is reported, never valid.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from serve_app.constraints.checks import ValueChecks
from serve_app.constraints.json_scan import Frame, JsonScanner, NotJson, Scalar, ScanState, Stop, child_path
from serve_app.constraints.keywords import escape_pointer

# Banned tokens (each a resample, or a rollback of one token) one row may spend on checks.
CHECK_BUDGET = 64
# A value refused this many times (a duplicate item at once) is written again from an earlier token.
ESCALATE_AFTER = 4


class Violation(NamedTuple):
    what: str
    start_token: int  # where the failing value's parent starts (its own start at the root): rollbacks stop there
    children: tuple[int, ...] = ()  # where its and its siblings' members start: where to write it again from
    value_token: int = -1  # the token holding the failing value's first character (inside a string's quote)
    duplicate: bool = False


class Watch(NamedTuple):
    """What the checks keep about an open object or array (its scanner frame's data)."""

    path: tuple[Any, ...]
    start_token: int  # the output token holding its bracket
    seen: tuple[str, ...] | None  # canonical items so far, in an array with uniqueItems
    watched: bool  # checked when it closes (or an item of a uniqueItems array)
    starts: tuple[int, ...] = ()  # the output token where each key or item begins
    key_at: int = -1  # the character where the latest key begins (its quote)


@dataclass
class CheckStats:
    evaluated: int = 0  # values checked at their close
    violations: int = 0  # closes refused (a banned token each)
    rollbacks: int = 0  # tokens taken back
    exhausted: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"evaluated": self.evaluated, "violations": self.violations, "rollbacks": self.rollbacks,
                "exhausted": self.exhausted}


class CheckScan(JsonScanner):
    """The scanner's hooks for one row: where values start (in tokens), and each value's checks at
    its close. Set `text`, `check_from` (values closing before it were checked by an earlier token)
    before a scan; `found` is the violation that stopped it."""

    def __init__(self, checker: RowChecker) -> None:
        self.checker = checker
        self.text, self.check_from = "", 0
        self.found: Violation | None = None

    def begin(self, parent: Frame | None, kind: str, ch: str, at: int) -> Any:
        token = self.checker.token_of(at)
        if kind not in ("obj", "arr"):
            return token
        path = () if parent is None else parent.data.path + (child_path(parent),)
        location = self.checker.checks.at(path)
        in_unique = parent is not None and parent.data.seen is not None
        return Watch(path, token, () if kind == "arr" and location.unique else None, location.watched or in_unique)

    def key_begun(self, frame: Frame, at: int) -> Frame:
        """A member is written again from its name's first character (its quote often shares a token with
        the comma or brace before it); a key past maxProperties is refused as it starts."""
        watch: Watch = frame.data
        most = self.checker.checks.at(watch.path).max_properties if watch.watched else None
        if most is not None and frame.items > most and at >= self.check_from:
            self.checker.stats.evaluated += 1
            self._fail(Violation(f"maxProperties: a property past {most} at {pointer(watch.path)}",
                                 watch.start_token, watch.starts))
        return frame._replace(data=watch._replace(starts=watch.starts + (self._next_token(at + 1),), key_at=at))

    def item_begun(self, frame: Frame, ch: str, at: int) -> Frame:
        """An item is written again from its first character (inside a string's quote)."""
        watch: Watch = frame.data
        return frame._replace(data=watch._replace(starts=watch.starts + (self._next_token(at + (ch == '"')),)))

    def key_closed(self, frame: Frame, key: str, at: int) -> Frame:
        watch: Watch = frame.data
        if at >= self.check_from:
            self._check_spelling(frame, key, at)
        names = self.checker.checks.at(watch.path).names if watch.watched and at >= self.check_from else ()
        if names:
            self.checker.stats.evaluated += 1
            if not all(_passes(validator, key) for validator in names):
                self._fail(Violation(f"a key refused (propertyNames, unevaluatedProperties): {key!r} at "
                                     f"{pointer(watch.path)}", watch.start_token,
                                     watch.starts))
        return frame

    def _check_spelling(self, frame: Frame, key: str, at: int) -> None:
        """A key an object already has, or a declared name spelled with escapes (an open object's grammar
        allows any name, in any spelling: the value would escape the declared property's subschema), is
        refused as its closing quote comes; written again from its opening quote."""
        watch: Watch = frame.data
        repeated = key in frame.keys
        escaped = "\\" in self.text[watch.key_at:at]
        if not repeated and not (escaped and key in self.checker.checks.at(watch.path).declared):
            return
        what = "a key the object already has" if repeated else "a declared property's name spelled with escapes"
        self._fail(Violation(f"{what}: {key!r} at {pointer(watch.path)}", self.checker.token_of(watch.key_at)))

    def value_closed(self, parent: Frame | None, value: Frame | Scalar, end: int, at: int) -> Frame | None:
        path = value.data.path if isinstance(value, Frame) else \
            (parent.data.path + (child_path(parent),) if parent is not None else ())
        location = self.checker.checks.at(path)
        unique = parent is not None and parent.data.seen is not None
        if not location.checks and not unique:
            return parent
        try:
            parsed = json.loads(self.text[value.start:end])
        except (ValueError, RecursionError):
            return parent  # the matcher decides what is JSON; an unparsable value is left to the final validation
        canonical = canonical_json(parsed) if unique else ""
        if max(end - 1, at) >= self.check_from:  # decided by this token's text: checked now
            self._check(parent, value, path, location.checks, parsed, canonical)
        if unique:
            assert parent is not None
            return parent._replace(data=parent.data._replace(seen=parent.data.seen + (canonical,)))
        return parent

    def _check(self, parent: Frame | None, value: Frame | Scalar, path: tuple[Any, ...], checks: tuple[Any, ...],
               parsed: Any, canonical: str) -> None:
        """Rollbacks may rewrite the value's siblings too (a duplicate of an earlier item; a token the grammar
        forces, shared with the end of the member before): back to its parent's start."""
        self.checker.stats.evaluated += 1
        start_token = value.data.start_token if isinstance(value, Frame) else value.data
        floor = parent.data.start_token if parent is not None else start_token
        members = tuple(sorted({*(parent.data.starts if parent is not None else ()),
                                *(value.data.starts if isinstance(value, Frame) else ())}))
        first = self.checker.token_of(value.start + 1) if self.text[value.start] == '"' else start_token
        if parent is not None and parent.data.seen is not None and canonical in parent.data.seen:
            self._fail(Violation(f"uniqueItems: a duplicate item at {pointer(path)}", floor, members, first, True))
        if not all(_passes(validator, parsed) for validator in checks):
            self._fail(Violation(f"a checked keyword fails at {pointer(path)}", floor, members, first))

    def _next_token(self, char: int) -> int:
        """The output token that holds character `char`, or the next one when the text ends before it."""
        return self.checker.token_of(char) if char < len(self.text) else len(self.checker.ends)

    def _fail(self, violation: Violation) -> None:
        self.found = violation
        raise Stop


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
    _scanner: CheckScan = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._scanner = CheckScan(self)

    # -- while sampling --------------------------------------------------------------------------

    def trial(self, text: str, final: bool = False) -> Violation | None:
        """Whether output text `text` (the current output and one more token) closes a value that
        fails a check; the scan is kept for `commit`. `final`: the output ends here (EOS)."""
        state, check_from = self._resume(text)
        state, found = self._scan(state, text, check_from)
        if final and found is None:
            state, found = self._scan(state, text, check_from, end=True)
        self._trial = (text, state)
        return found

    def commit(self, text: str) -> None:
        """The token was kept and the output is now `text`."""
        if self._trial is not None and self._trial[0] == text:
            state = self._trial[1]
        else:
            state, _ = self._scan(self._resume(text)[0], text, len(text))
        self.states.append(state)
        self.ends.append(state.pos)
        self.text, self._trial = text, None

    def _resume(self, text: str) -> tuple[ScanState, int]:
        """Where to scan `text` from, and the first character not checked yet. Decoding is not always
        prefix-stable (a character split across tokens): then from the last state before it differs."""
        if text.startswith(self.text):
            return self.states[-1], len(self.text)
        check_from = common_prefix(text, self.text)
        return self.states[bisect.bisect_right(self.ends, check_from) - 1], check_from

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
        starts = [frames[max(0, d - 1)].data.start_token for d, f in enumerate(frames) if f.data.watched]
        if state.scalar is not None and state.scalar.kind == "key":  # its spelling is checked as it closes
            starts.append(self.token_of(state.scalar.start))
        if state.scalar is not None and state.scalar.kind != "key" and self._scalar_watched(state):
            starts.append(frames[-1].data.start_token if frames else state.scalar.data)
        return min(starts, default=len(self.states) - 1)

    def settled_chars(self) -> int:
        """Characters of output no rollback can change (what a stream may send)."""
        return self.states[self.floor()].pos if self.floor() < len(self.states) else len(self.text)

    def token_of(self, char: int) -> int:
        """The output token whose text holds character `char` (the token being tried, past the scan)."""
        return bisect.bisect_right(self.ends, char) - 1 if char < self.ends[-1] else len(self.ends) - 1

    # -- scanning --------------------------------------------------------------------------------

    def _scalar_watched(self, state: ScanState) -> bool:
        parent = state.frames[-1] if state.frames else None
        path = parent.data.path + (child_path(parent),) if parent is not None else ()
        return bool(self.checks.at(path).checks) or (parent is not None and parent.data.seen is not None)

    def _scan(self, state: ScanState, text: str, check_from: int,
              end: bool = False) -> tuple[ScanState, Violation | None]:
        """`state` read on to the end of `text` (`end`: the output ends there, a root number closes),
        and the violation that stopped it. Text that is not JSON ends the checks (the validation after
        generation still runs)."""
        if state.done and not state.frames and state.scalar is None:
            return state._replace(pos=len(text)), None  # the root closed (or the text is not JSON)
        scan = self._scanner
        scan.text, scan.check_from, scan.found = text, check_from, None
        try:
            return (scan.close_number(state) if end else scan.scan(state, text[state.pos:])), None
        except Stop:
            return scan.stopped or state, scan.found
        except NotJson:
            return ScanState((), None, True, len(text)), None


def _passes(validator: Any, value: Any) -> bool:
    try:
        return bool(validator.is_valid(value))
    except Exception:  # noqa: BLE001 - undecided (a slow pattern): not proven valid
        return False


def pointer(path: tuple[Any, ...]) -> str:
    return "/" + "/".join(escape_pointer(str(p)) for p in path)


def canonical_json(value: Any) -> str:
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


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
