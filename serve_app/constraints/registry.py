"""The one list of backends: their names, which constraint kinds each compiles, the default
cascade order, which are installed here, and the per-model choice of backend per kind.

Config, keyword tables, planning and the engine's backend modules all read it from here:
adding a backend is one entry here, its keyword table in `keywords.py` and one module in
`serve_app/engine/backends/`.
"""

from __future__ import annotations

import importlib.util
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

BackendName = Literal["llguidance", "outlines_core", "xgrammar"]
BACKENDS: tuple[BackendName, ...] = get_args(BackendName)
# Constraint kinds each backend compiles (Lark grammars: llguidance only).
KINDS: dict[str, frozenset[str]] = {
    "llguidance": frozenset({"json_schema", "regex", "choice", "grammar"}),
    "outlines_core": frozenset({"json_schema", "regex", "choice"}),
    "xgrammar": frozenset({"json_schema", "regex", "choice"}),
}
# Measured on real-world schemas (docs/json-schema.md): llguidance compiles in milliseconds and
# errors instead of approximating; xgrammar is fast but approximates silently (its warnings are
# read); outlines_core's regex index takes from 0.1 s to timeouts on large schemas.
DEFAULT_CASCADE: tuple[BackendName, ...] = ("llguidance", "xgrammar", "outlines_core")


def installed_backends() -> tuple[str, ...]:
    """Backends importable here (found, not imported: the router stays light)."""
    return tuple(name for name in BACKENDS if importlib.util.find_spec(name) is not None)


class BackendDefaults(BaseModel):
    """Which backend compiles each constraint kind. llguidance is the default for every kind: on
    SmolLM2's 49k vocab it prepares a JSON schema in ~2 ms against outlines_core's ~170 ms, and
    it errors on keywords it cannot enforce instead of ignoring them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # "cascade": the first backend of `cascade` that enforces the schema exactly
    # (docs/json-schema.md); or one backend for every schema.
    json_schema: BackendName | Literal["cascade"] = Field(
        "cascade", description="cascade, or one backend for every schema")
    cascade: list[BackendName] = Field(default_factory=lambda: list(DEFAULT_CASCADE), min_length=1,
                                       description="tried in this order where installed")
    undeclared_properties: bool = Field(
        False, description="false: an object whose schema leaves additionalProperties out gets only its declared "
        "properties (a subset of valid outputs: what OpenAI's strict mode and xgrammar generate); true: also others, "
        "as JSON Schema allows. A request's undeclared_properties overrides it")
    regex: BackendName = "llguidance"
    choice: BackendName = "llguidance"
    grammar: BackendName = Field("llguidance", description="Lark grammars: llguidance only")
