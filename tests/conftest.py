"""Shared fixtures: the tiny random Llama (built once, cached) and an engine on it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Markers by scope, so `make test-fast` can leave out what needs Ray or SmolLM2."""
    for item in items:
        parts = item.path.parts
        if "integration" in parts:
            item.add_marker(pytest.mark.cluster)
        if "e2e" in parts:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    from serve_app.models import TINY, prepare

    return str(prepare(TINY))


@pytest.fixture(scope="session")
def tiny_config(tiny_model_dir: str):
    from serve_app.config import ModelConfig

    # Greedy unless a test asks for sampling (with a seed): no test can fail by chance.
    return ModelConfig(name="tiny", source=tiny_model_dir, limits={"max_new_tokens": 128},
                       sampling={"temperature": 0})


@pytest.fixture(scope="session")
def tiny_engine(tiny_config):
    from serve_app.engine.factory import create_engine

    with create_engine(tiny_config) as engine:
        yield engine
