"""The engine a model's `engine:` names, built for the GPUs the replica was given."""

from __future__ import annotations

from collections.abc import Sequence

from serve_app.config import ModelConfig
from serve_app.engine.placement import GpuInfo
from serve_app.engine.protocol import Engine


def create_engine(config: ModelConfig, gpus: Sequence[GpuInfo] = ()) -> Engine:
    """Plan for `gpus` (none = CPU), load, warm up, precompile the named constraints."""
    if config.engine == "transformers":
        from serve_app.engine.transformers_engine import TransformersEngine

        return TransformersEngine.from_config(config, gpus)
    if config.engine == "vllm":
        try:
            from serve_app.engine.vllm_engine import VllmEngine
        except ImportError as error:  # pragma: no cover - the message is the point
            raise RuntimeError(f"engine: vllm needs vLLM (in the lock; or the vllm extra): {error}") from None
        return VllmEngine.from_config(config, gpus)
    raise ValueError(f"unknown engine {config.engine!r}")  # the config's Literal keeps this unreachable
