"""Regexes where the grammar and the checks share them (checks.py): a `pattern` with features no
grammar has, and `patternProperties` whose regexes may match one name.

- `grammar_pattern`: the pattern without lookarounds and word boundaries (zero-width: dropping them
  only lets more strings through) and with each backreference as any text: what the grammar
  compiles; the check at the string's close applies the pattern as written.
- `overlapping_patterns`: whether two `patternProperties` regexes may match one name (llguidance
  refuses those; the grammar gets their union and the check makes a name satisfy each).
No torch import: the router plans with this.
"""

from __future__ import annotations

import functools
import re
from typing import Any

# Regex features no grammar has (lookarounds, backreferences, word boundaries): a `pattern` with one is
# checked where its string closes (the `regex` module reads them), the string's other keywords compiled.
GRAMMARLESS_REGEX = re.compile(r"\(\?[=!]|\(\?<[=!]|\\[1-9]|\(\?P=|\\[bB]")  # (not `\k<n>`: the regex module lacks it)
# Regexes `overlapping_patterns` compares at most, and their longest: past them it says nothing.
MAX_COMPARED_PATTERNS, MAX_COMPARED_LENGTH = 16, 200


def overlapping_patterns(patterns: Any) -> bool:
    """Whether two `patternProperties` regexes may match one name (llguidance refuses them: a name
    matching both must satisfy both subschemas); False where that is not decided here (then
    llguidance decides)."""
    if not isinstance(patterns, dict) or not 2 <= len(patterns) <= MAX_COMPARED_PATTERNS:
        return False
    return _overlapping(tuple(patterns))


@functools.lru_cache(maxsize=256)
def _overlapping(patterns: tuple[str, ...]) -> bool:
    whole = {pattern: full for pattern in patterns if (full := _whole_name(pattern)) is not None}
    if len(whole) < len(patterns):
        return False
    try:
        from interegular import parse_pattern
        from interegular.comparator import Comparator

        return any(True for _ in Comparator({p: parse_pattern(full) for p, full in whole.items()}).check(list(whole)))
    except Exception:  # noqa: BLE001 - a regex interegular does not read (lookarounds, classes): undecided
        return False


def _whole_name(pattern: str) -> str | None:
    """A search pattern (JSON Schema's `pattern` semantics) as one matching the whole name, where its
    only anchors are a leading `^` and a trailing `$`."""
    start, end = pattern.startswith("^"), pattern.endswith("$") and not pattern.endswith("\\$")
    body = pattern[int(start):len(pattern) - int(end)]
    if len(pattern) > MAX_COMPARED_LENGTH or "^" in body.replace("[^", "[") or "$" in body or "\\b" in body:
        return None
    return ("" if start else ".*") + f"(?:{body})" + ("" if end else ".*")


def grammar_pattern(pattern: str) -> str:
    """`pattern` with its lookarounds and `\\b`/`\\B` left out and each backreference as `(?:.*)`: a regex
    every string the pattern matches also matches ("" where nothing is left)."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "[":
            end = _class_end(pattern, i)
            out.append(pattern[i:end])
            i = end
        elif ch == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if nxt in "bB":
                i += 2
            elif nxt in "123456789" or pattern.startswith("k<", i + 1):
                end = pattern.index(">", i) + 1 if nxt == "k" and ">" in pattern[i:] else i + 2
                out.append("(?:.*)")
                i = end
            else:
                out.append(pattern[i:i + 2])
                i += 2
        elif pattern.startswith(("(?=", "(?!", "(?<=", "(?<!"), i):
            i = _group_end(pattern, i)
        elif pattern.startswith("(?P=", i):
            out.append("(?:.*)")
            i = _group_end(pattern, i)
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _class_end(pattern: str, i: int) -> int:
    """The index after the character class opening at `i`."""
    j = i + 1 + (pattern[i + 1:i + 2] == "^")
    j += pattern[j:j + 1] == "]"  # a leading "]" is a member
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return min(j + 1, len(pattern))


def _group_end(pattern: str, i: int) -> int:
    """The index after the group opening at `i`."""
    depth, j = 0, i
    while j < len(pattern):
        ch = pattern[j]
        if ch == "\\":
            j += 2
            continue
        if ch == "[":
            j = _class_end(pattern, j)
            continue
        depth += (ch == "(") - (ch == ")")
        j += 1
        if depth == 0:
            return j
    return j
