"""The running rows of a decode loop and their shared, left-padded KV cache."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from serve_app.engine.sampling import new_generator
from serve_app.engine.stream import Stream


def cache_keyword(model: Any) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Batch:
    """The running rows and their shared, left-padded KV cache."""

    def __init__(self) -> None:
        self.streams: list[Stream] = []
        self.generators: list[torch.Generator] = []
        self.positions: list[int] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.streams)

    def clear(self) -> None:
        self.streams, self.generators, self.positions = [], [], []
        self.cache, self.mask = None, None

    def merge(self, streams: list[Stream], cache: Any, mask: torch.Tensor) -> None:
        """Add prefilled rows: pad both caches on the left to a common width, then concatenate."""
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            assert self.mask is not None
            width = max(self.mask.shape[1], mask.shape[1])
            for old, new in zip(self.cache.layers, cache.layers, strict=True):
                old.keys = torch.cat([_left_pad(old.keys, width, 2), _left_pad(new.keys, width, 2)])
                old.values = torch.cat([_left_pad(old.values, width, 2), _left_pad(new.values, width, 2)])
            self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        self.streams += streams
        self.generators += [new_generator(s.row.seed) for s in streams]
        self.positions += [len(s.context_ids()) for s in streams]

    def keep(self, indices: list[int]) -> None:
        """Drop finished rows, then the padding columns no remaining row needs."""
        if not indices:
            self.clear()
            return
        index = torch.tensor(indices, device=self.mask.device if self.mask is not None else None)
        assert self.mask is not None
        self.mask = self.mask.index_select(0, index)
        start = int((self.mask.sum(0) > 0).nonzero()[0])
        self.mask = self.mask[:, start:]
        for layer in getattr(self.cache, "layers", []):
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[:, :, start:]
            layer.values = layer.values.index_select(0, index.to(layer.values.device))[:, :, start:]
        self.streams = [self.streams[i] for i in indices]
        self.generators = [self.generators[i] for i in indices]
        self.positions = [self.positions[i] for i in indices]


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - dim - 1) + [missing, 0]
    return F.pad(tensor, pad)


def joinable_cache(cache: Any) -> bool:
    """Rows can join a running batch only with plain per-layer key/value tensors."""
    layers = list(getattr(cache, "layers", None) or [])
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


