"""The minimum budget of a planned constraint: the fewest tokens of a complete output we can
construct, and, for a JSON Schema, the closer that keeps an output within its `max_tokens`. One
function for every engine: a request whose `max_tokens` is below it gets the same 400 from each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from serve_app.constraints.json_completion import JsonCloser
from serve_app.constraints.kinds import ChoiceConstraint, JsonSchemaConstraint
from serve_app.constraints.plan import Plan
from serve_app.constraints.validation import ENFORCED_FORMATS

logger = logging.getLogger(__name__)
COMPACT = (",", ":")


@dataclass(frozen=True)
class Budget:
    closer: JsonCloser | None  # shortest completions, for closing JSON within max_tokens
    min_tokens: int | None  # None: no minimum known (the engine's own length limit decides)


def minimum_budget(plan: Plan, encode: Callable[[str], list[int]], separators: tuple[str, str] = COMPACT) -> Budget:
    """`encode`: the fewest tokens that spell a text; `separators`: what the grammar writes
    between items and after keys."""
    constraint = plan.constraint
    if isinstance(constraint, ChoiceConstraint):
        return Budget(None, min(len(encode(choice)) for choice in constraint.choices))
    if not isinstance(constraint, JsonSchemaConstraint):
        return Budget(None, None)
    # The normalised schema accepts the same instances, in shapes the closer follows (if/then/else and
    # oneOf as anyOf branches, refs inlined); with checks, the grammar's schema, and a completion must
    # pass the checked keywords too. Else (no completion known for it) the schema as sent.
    target = plan.target if isinstance(plan.target, JsonSchemaConstraint) else constraint
    try:
        closer = JsonCloser(target.json_schema, encode, ENFORCED_FORMATS, separators, whole=plan.check_schema)
        if closer.min_text is None and target is not constraint:
            closer = JsonCloser(constraint.json_schema, encode, ENFORCED_FORMATS, separators)
    except Exception:  # noqa: BLE001 - no closer means honest truncation, never a failed request
        logger.warning("cannot build a closer for %s", plan.key, exc_info=True)
        return Budget(None, None)
    return Budget(closer, closer.min_tokens)
