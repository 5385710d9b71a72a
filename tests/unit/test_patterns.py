"""Regexes the grammar and the checks share (patterns.py): what the grammar keeps of a pattern with
features no grammar has is a superset of it, and a schema using one is planned with a check."""

from __future__ import annotations

import itertools

import pytest
import regex

from serve_app.constraints.patterns import GRAMMARLESS_REGEX, grammar_pattern
from serve_app.constraints.plan import plan_schema

CASES = {
    "^(?!.*--)[a-z-]{3,10}$": "^[a-z-]{3,10}$",
    "\\bcat\\b": "cat",
    "^(a+)-\\1$": "^(a+)-(?:.*)$",
    "^(?=.*[A-Z])(?=.*\\d)[A-Za-z\\d]{8,}$": "^[A-Za-z\\d]{8,}$",
    "[\\b(?=]x": "[\\b(?=]x",  # (inside a class: characters, not assertions)
    "(?<!\\()y(?=[)])": "y",
    "^(?P<n>[ab])(?P=n)$": "^(?P<n>[ab])(?:.*)$",
}


@pytest.mark.parametrize(("pattern", "kept"), list(CASES.items()))
def test_the_grammar_keeps_the_pattern_without_what_no_grammar_has(pattern: str, kept: str) -> None:
    assert GRAMMARLESS_REGEX.search(pattern) is not None or pattern.startswith("[")
    assert grammar_pattern(pattern) == kept


@pytest.mark.parametrize("pattern", list(CASES))
def test_what_the_grammar_keeps_matches_every_string_the_pattern_matches(pattern: str) -> None:
    alphabet = "aAbc1-( )x"
    strings = ["".join(p) for n in range(6) for p in itertools.product(alphabet, repeat=n) if n < 4 or p[0] == "a"]
    strings += ["cat", "a cat", "concat", "Abcdefg1", "aa-aa", "a-a"]
    for text in strings:
        if regex.search(pattern, text):
            assert regex.search(grammar_pattern(pattern), text), (pattern, text)


def test_a_pattern_with_a_lookahead_is_planned_with_a_check() -> None:
    plan = plan_schema({"type": "string", "pattern": "^(?!.*--)[a-z-]+$"}, ("llguidance",))
    assert plan.exact == ("llguidance",) and plan.checks == ("pattern at #/",)
    assert plan.schema == {"type": "string", "pattern": "^[a-z-]+$"}
