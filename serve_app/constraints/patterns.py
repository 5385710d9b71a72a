"""Regexes where the grammar and the checks share them (checks.py): a `pattern` with features no
grammar has, and `patternProperties` whose regexes may match one name.

- `grammar_pattern`: the pattern without lookarounds and word boundaries (zero-width: dropping them
  only lets more strings through) and with each backreference as any text: what the grammar
  compiles; the check at the string's close applies the pattern as written.
- `overlapping_patterns`: whether two `patternProperties` regexes match one name (llguidance
  refuses those; the grammar gets their union and the check makes a name satisfy each).
No torch import: the router plans with this.
"""

from __future__ import annotations

import functools
import itertools
import re
import time
from typing import Any

from serve_app.constraints.examples import regex_example
from serve_app.constraints.validation import PATTERN_TIMEOUT_S, regex_search

# Regex features no grammar has (lookarounds, backreferences, word boundaries): a `pattern` with one is
# checked where its string closes (the `regex` module reads them), the string's other keywords compiled.
GRAMMARLESS_REGEX = re.compile(r"\(\?[=!]|\(\?<[=!]|\\[1-9]|\(\?P=|\\[bB]")  # (not `\k<n>`: the regex module lacks it)
# Regexes `overlapping_patterns` compares at most, and the time it spends: past them it says nothing.
MAX_COMPARED_PATTERNS, MAX_COMPARE_S = 16, 0.5


def overlapping_patterns(patterns: Any) -> bool:
    """Whether two `patternProperties` regexes match one name (llguidance refuses them: a name
    matching both must satisfy both subschemas), shown by a witness: a name built from their
    shortest examples (each alone, or one after the other) that both match. Where none is found,
    False: llguidance then decides (it refuses what overlaps). Bounded: no automaton is built."""
    if not isinstance(patterns, dict) or not 2 <= len(patterns) <= MAX_COMPARED_PATTERNS:
        return False
    return _overlapping(tuple(patterns))


@functools.lru_cache(maxsize=256)
def _overlapping(patterns: tuple[str, ...]) -> bool:
    deadline = time.monotonic() + MAX_COMPARE_S
    examples = {p: regex_example(p) for p in patterns}
    for a, b in itertools.combinations(patterns, 2):
        ea, eb = examples[a], examples[b]
        for name in {n for n in (ea, eb, (ea or "") + (eb or ""), (eb or "") + (ea or "")) if n is not None}:
            if time.monotonic() > deadline:
                return False
            if regex_search(a, name, PATTERN_TIMEOUT_S) and regex_search(b, name, PATTERN_TIMEOUT_S):
                return True
    return False


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
