"""One incremental JSON scanner for everything that follows generated text as it grows: closing
(json_completion.py: the shortest completion of a prefix) and the checks made while generating
(checks.py: a value's checked keywords at its close).

The scanner knows JSON's structure only; what a consumer knows about a value (the subschemas
that apply, where its tokens start) rides in each open value's `data`, which the consumer's hooks
compute as values begin and close. States are tuples of named tuples: a state kept per token
costs nothing to copy, and going back to an earlier one is a lookup.

    a value begins   begin(parent, kind, ch, at) -> data     (kind: obj, arr, str, num, lit)
    a key begins     key_begun(frame, at) -> frame
    a key closes     key_closed(frame, key, at) -> frame
    an item begins   item_begun(frame, ch, at) -> frame      (before its begin)
    a value closes   value_closed(parent, value, end, at) -> parent   (parent None at the root)

A hook raises `NotJson` to refuse (the text cannot continue as this consumer follows it) and
`Stop` to end the scan where it is (a check failed). No torch: pure Python over text.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
LITERALS = {"t": "true", "f": "false", "n": "null"}
_WHITESPACE = frozenset(" \t\n\r")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_HEX = frozenset("0123456789abcdefABCDEF")
_PLAIN_RUN = re.compile(r'[^"\\]+')  # string characters that need no decision


class NotJson(Exception):
    """The text cannot continue as JSON (or as the consumer follows it)."""


class Stop(Exception):
    """A hook ends the scan here (the consumer found what it looks for)."""


class Frame(NamedTuple):
    kind: str  # "obj" | "arr"
    phase: str  # obj: open | key | colon | value | after; arr: open | value | after
    key: str | None  # obj: the member whose value comes or is being read
    keys: tuple[str, ...]  # obj: the keys closed so far
    items: int  # obj: keys begun; arr: items begun
    start: int  # character offset of the bracket
    data: Any


class Scalar(NamedTuple):
    kind: str  # "str" | "key" | "num" | "lit"
    start: int  # character offset of its first character (the quote of a string)
    text: str  # decoded characters so far (strings), or the text so far (numbers, literals)
    escape: str  # inside a string: "" | "\\" | "u" + the hex digits read so far
    data: Any


class ScanState(NamedTuple):
    frames: tuple[Frame, ...] = ()
    scalar: Scalar | None = None
    done: bool = False  # the root value closed
    pos: int = 0  # characters read


def value_kind(ch: str) -> str | None:
    """The kind of value a character begins (None: no value begins with it)."""
    if ch == "{":
        return "obj"
    if ch == "[":
        return "arr"
    if ch == '"':
        return "str"
    if ch == "-" or ch.isdigit():
        return "num"
    return "lit" if ch in LITERALS else None


class JsonScanner:
    """Reads JSON text into `ScanState`s; subclasses give the hooks meaning."""

    stopped: ScanState | None = None  # where the last scan a hook stopped was

    def begin(self, parent: Frame | None, kind: str, ch: str, at: int) -> Any:
        return None

    def key_begun(self, frame: Frame, at: int) -> Frame:
        return frame

    def key_closed(self, frame: Frame, key: str, at: int) -> Frame:
        return frame

    def item_begun(self, frame: Frame, ch: str, at: int) -> Frame:
        return frame

    def value_closed(self, parent: Frame | None, value: Frame | Scalar, end: int, at: int) -> Frame | None:
        """`value` spans [value.start, end); `at` is where its close was seen (past `end` for a number,
        closed by the character after it)."""
        return parent

    # -- reading -----------------------------------------------------------------------------------

    def scan(self, state: ScanState, chunk: str) -> ScanState:
        """`state` after `chunk`, which continues the text at `state.pos`. Raises NotJson or Stop
        (the state reached is then `self.stopped`)."""
        scalar = state.scalar
        if scalar is not None and scalar.kind in ("str", "key") and not scalar.escape and _PLAIN_RUN.fullmatch(chunk):
            # Inside a string, nothing to decide (most tokens of most outputs): no structure changes.
            return ScanState(state.frames, Scalar(scalar.kind, scalar.start, scalar.text + chunk, "", scalar.data),
                             state.done, state.pos + len(chunk))
        frames, done = list(state.frames), state.done
        i, n, base = 0, len(chunk), state.pos
        try:
            while i < n:
                if scalar is not None and scalar.kind in ("str", "key") and not scalar.escape:
                    run = _PLAIN_RUN.match(chunk, i)
                    if run is not None:
                        scalar = Scalar(scalar.kind, scalar.start, scalar.text + run.group(), "", scalar.data)
                        i = run.end()
                        continue
                ch = chunk[i]
                if scalar is None and ch in _WHITESPACE:
                    i += 1
                    continue
                if done and not frames and scalar is None:
                    raise NotJson("text after the value")
                scalar, consumed = self._char(frames, scalar, ch, base + i)
                done = done or (not frames and scalar is None)  # the root value just closed
                i += consumed
        except Stop:
            self.stopped = ScanState(tuple(frames), scalar, done, base + i)
            raise
        return ScanState(tuple(frames), scalar, done, base + n)

    def _char(self, frames: list[Frame], scalar: Scalar | None, ch: str, at: int) -> tuple[Scalar | None, int]:
        """One character past whitespace between values: (the scalar being read, characters consumed:
        0 when a number ended here and the character is read again as structure)."""
        if scalar is not None:
            if scalar.kind in ("str", "key"):
                return self._string_char(frames, scalar, ch, at), 1
            if scalar.kind == "lit":
                return self._literal_char(frames, scalar, ch, at), 1
            if ch in _NUMBER_CHARS:
                return Scalar("num", scalar.start, scalar.text + ch, "", scalar.data), 1
            self._close(frames, scalar, at, at)
            return None, 0
        if not frames:
            return self._begin(frames, None, ch, at), 1
        top = frames[-1]
        if top.kind == "obj":
            return self._object_char(frames, top, ch, at), 1
        return self._array_char(frames, top, ch, at), 1

    def _begin(self, frames: list[Frame], parent: Frame | None, ch: str, at: int) -> Scalar | None:
        kind = value_kind(ch)
        if kind is None:
            raise NotJson(f"no value begins with {ch!r}")
        data = self.begin(parent, kind, ch, at)
        if kind in ("obj", "arr"):
            frames.append(Frame(kind, "open", None, (), 0, at, data))
            return None
        return Scalar(kind, at, "" if kind == "str" else ch, "", data)

    def _object_char(self, frames: list[Frame], top: Frame, ch: str, at: int) -> Scalar | None:
        phase = top.phase
        if ch == "}" and phase in ("open", "after"):
            frames.pop()
            self._close(frames, top, at + 1, at)
        elif ch == '"' and phase in ("open", "key"):
            frames[-1] = self.key_begun(Frame("obj", phase, None, top.keys, top.items + 1, top.start, top.data), at)
            return Scalar("key", at, "", "", None)
        elif ch == "," and phase == "after":
            frames[-1] = Frame("obj", "key", None, top.keys, top.items, top.start, top.data)
        elif ch == ":" and phase == "colon":
            frames[-1] = Frame("obj", "value", top.key, top.keys, top.items, top.start, top.data)
        elif phase == "value":
            frames[-1] = Frame("obj", "after", top.key, top.keys, top.items, top.start, top.data)
            return self._begin(frames, frames[-1], ch, at)
        else:
            raise NotJson(f"{ch!r} in an object ({phase})")
        return None

    def _array_char(self, frames: list[Frame], top: Frame, ch: str, at: int) -> Scalar | None:
        phase = top.phase
        if ch == "]" and phase in ("open", "after"):
            frames.pop()
            self._close(frames, top, at + 1, at)
        elif ch == "," and phase == "after":
            frames[-1] = Frame("arr", "value", None, (), top.items, top.start, top.data)
        elif phase in ("open", "value"):
            frames[-1] = self.item_begun(Frame("arr", "after", None, (), top.items + 1, top.start, top.data), ch, at)
            return self._begin(frames, frames[-1], ch, at)
        else:
            raise NotJson(f"{ch!r} in an array ({phase})")
        return None

    def _string_char(self, frames: list[Frame], scalar: Scalar, ch: str, at: int) -> Scalar | None:
        escape = scalar.escape
        if escape == "\\":
            if ch == "u":
                return scalar._replace(escape="u")
            if ch not in ESCAPES:
                raise NotJson(f"\\{ch} is no escape")
            return scalar._replace(text=scalar.text + ESCAPES[ch], escape="")
        if escape:
            if ch not in _HEX:
                raise NotJson("\\u needs four hex digits")
            escape += ch
            if len(escape) == 5:
                return scalar._replace(text=scalar.text + chr(int(escape[1:], 16)), escape="")
            return scalar._replace(escape=escape)
        if ch == "\\":
            return scalar._replace(escape="\\")
        if ch != '"':
            return Scalar(scalar.kind, scalar.start, scalar.text + ch, "", scalar.data)
        if scalar.kind == "key":
            top = frames[-1]
            frames[-1] = self.key_closed(Frame("obj", "colon", scalar.text, top.keys, top.items, top.start, top.data),
                                         scalar.text, at)
        else:
            self._close(frames, scalar, at + 1, at)
        return None

    def _literal_char(self, frames: list[Frame], scalar: Scalar, ch: str, at: int) -> Scalar | None:
        text, word = scalar.text + ch, LITERALS[scalar.text[0]]
        if not word.startswith(text):
            raise NotJson(f"{text!r} is no literal")
        if text != word:
            return scalar._replace(text=text)
        self._close(frames, scalar._replace(text=text), at + 1, at)
        return None

    def _close(self, frames: list[Frame], value: Frame | Scalar, end: int, at: int) -> None:
        """`value` closed; `frames` holds its ancestors, the parent last."""
        parent = frames[-1] if frames else None
        if parent is not None and parent.kind == "obj" and parent.key is not None:
            parent = Frame("obj", parent.phase, parent.key, parent.keys + (parent.key,), parent.items, parent.start,
                           parent.data)
        updated = self.value_closed(parent, value, end, at)
        if frames and updated is not None:
            frames[-1] = updated

    def close_number(self, state: ScanState) -> ScanState:
        """`state` with its open number closed where the text stands (the text ends here, or the
        next character will close it): the one value that needs a delimiter."""
        scalar = state.scalar
        if scalar is None or scalar.kind != "num":
            return state
        frames = list(state.frames)
        self._close(frames, scalar, state.pos, state.pos)
        return ScanState(tuple(frames), None, state.done or not frames, state.pos)


def child_path(parent: Frame) -> Any:
    """The key or index of the value being read inside `parent` (whose phase moved past its start)."""
    return parent.key if parent.kind == "obj" else parent.items - 1
