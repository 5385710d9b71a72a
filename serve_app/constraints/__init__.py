"""The constraint language, pure Python (no torch, no backend import): the router and the engine
both use it.

    kinds.py       the constraint union (JSON Schema, regex, choice, Lark grammar), cache keys,
                   output checks, each kind's semantic check
    limits.py      a model's limits; check_constraint: limits first, then semantics
    keywords.py    which keywords and formats each backend enforces; walkers over a schema
    normalize.py   meaning-preserving JSON Schema rewrites
    checks.py      keywords no grammar has, checked while generating as each value closes
    plan.py        plan_constraint: everything decided before a backend compiles
    registry.py    the backends' names, kinds and default order; which are installed
    checking.py    output checks whose every regex has a time limit
    completion.py  the shortest JSON completion of a prefix (closing, minimum budgets)
"""

from serve_app.constraints.kinds import (
    SOURCE_FIELD,
    AnyConstraint,
    ChoiceConstraint,
    Constraint,
    GrammarConstraint,
    JsonSchemaConstraint,
    RegexConstraint,
    build_constraint,
)
from serve_app.constraints.limits import (
    LimitsConfig,
    check_constraint,
    check_limits,
    check_max_new_tokens,
    group_depth,
    parse_constraint,
)
from serve_app.constraints.plan import Plan, plan_constraint
from serve_app.constraints.registry import BACKENDS, BackendDefaults, BackendName, installed_backends

__all__ = [
    "BACKENDS", "SOURCE_FIELD", "AnyConstraint", "BackendDefaults", "BackendName", "ChoiceConstraint", "Constraint",
    "GrammarConstraint", "JsonSchemaConstraint", "LimitsConfig", "Plan", "RegexConstraint", "build_constraint",
    "check_constraint", "check_limits", "check_max_new_tokens", "group_depth", "installed_backends",
    "parse_constraint", "plan_constraint",
]
