"""Constraint backends, one module each behind one protocol (base.py). A backend's module is
named as the registry names it (serve_app/constraints/registry.py) and exports `BACKEND`, its
class; `backend_class` imports only the one asked for (xgrammar is optional)."""

from __future__ import annotations

import importlib

from serve_app.constraints import BACKENDS
from serve_app.engine.backends.base import Backend, BackendContext, Compiled, Matcher, bitmask_words


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise KeyError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    return importlib.import_module(f"serve_app.engine.backends.{name}").BACKEND


__all__ = ["Backend", "BackendContext", "Compiled", "Matcher", "backend_class", "bitmask_words"]
