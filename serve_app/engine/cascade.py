"""Which backends can enforce a JSON Schema exactly, decided before compiling anything.

The schema is normalised first (rewrites that keep meaning, `normalize.py`); then each backend
of the cascade, in order, is checked against its keyword table (`schema_support.SUPPORTED`).
Those that pass are compiled in that order by `ConstraintCompiler`, which falls through on an
explicit error, a detected approximation or the compile timeout. No torch or Outlines import:
the router uses `plan_schema` to reject a schema no backend can enforce before it reaches a
replica.

Default order, from measurement (`bench/schema_coverage.py`, SmolLM2's tokenizer): llguidance
first (compiles in milliseconds and errors instead of approximating), then xgrammar when it is
installed (fast, but approximates silently: its warnings are parsed), then outlines_core (its
regex index takes from 0.1 s to timeouts on large schemas).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from serve_app.engine.normalize import normalize_schema
from serve_app.engine.schema_support import SUPPORTED_FORMATS, unsupported_keywords
from serve_app.errors import ConstraintError

CASCADE = ("llguidance", "xgrammar", "outlines_core")
KNOWN_FORMATS = frozenset().union(*SUPPORTED_FORMATS.values())


@dataclass(frozen=True)
class SchemaPlan:
    schema: dict[str, Any]  # normalised
    rewrites: tuple[str, ...]
    exact: tuple[str, ...]  # backends whose tables cover every keyword, in cascade order
    missing: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # backend -> (keyword, pointer)

    def rejection(self, strict: bool = True) -> ConstraintError:
        """The 400 for a schema no backend enforces: the first keyword (and its pointer in the
        schema as sent) that the first backend of the cascade lacks."""
        backend = next(iter(self.missing))
        keyword, pointer = self.missing[backend][0]
        others = [f"{b} also lacks '{m[0][0]}' at #{m[0][1] or '/'}" for b, m in self.missing.items() if b != backend]
        more = f" ({len(self.missing[backend]) - 1} more)" if len(self.missing[backend]) > 1 else ""
        hint = "; set strict: false to accept an approximation checked after generation" if strict else ""
        return ConstraintError(
            f"unsupported JSON Schema keyword '{keyword}' at #{pointer or '/'} for backend {backend}{more}: "
            f"no backend enforces it exactly{' (' + '; '.join(others) + ')' if others else ''}{hint}",
            param="json_schema", code="unsupported_keyword")


def plan_schema(schema: dict[str, Any], order: Sequence[str], max_nodes: int = 10_000) -> SchemaPlan:
    normalized = normalize_schema(schema, KNOWN_FORMATS, max_nodes)
    exact: list[str] = []
    missing: dict[str, list[tuple[str, str]]] = {}
    for backend in order:
        found = unsupported_keywords(normalized.schema, backend)
        if found:  # point into the schema as sent where the keyword is there too ($refs get inlined)
            as_sent: dict[str, str] = {}
            for keyword, pointer in unsupported_keywords(schema, backend):
                as_sent.setdefault(keyword, pointer)
            missing[backend] = [(k, as_sent.get(k, p)) for k, p in found]
        else:
            exact.append(backend)
    return SchemaPlan(normalized.schema, normalized.rewrites, tuple(exact), missing)
