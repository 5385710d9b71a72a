"""The running rows of a decode loop and their shared, left-padded KV cache; how newly admitted
rows are grouped to be prefilled."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from serve_app.engine.sampling import new_generator
from serve_app.engine.stream import Stream


def cache_keyword(model: Any) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; accept both."""
    return "cache" if accepts_keyword(model, "cache") else "past_key_values"


def accepts_keyword(model: Any, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


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

    def merge(self, streams: list[Stream], cache: Any, mask: torch.Tensor, cached: list[int] | None = None) -> None:
        """Add rows: pad both caches on the left to a common width, then concatenate. `cached`: how
        many of each row's context tokens the cache holds (default: all, as after a prefill)."""
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
        self.positions += cached if cached is not None else [len(s.context_ids()) for s in streams]

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
            if isinstance(layer, GrowableLayer):
                layer.keep_rows(indices, start)
                continue
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
    return bool(layers) and all(type(layer).__name__ in ("DynamicLayer", "GrowableLayer") for layer in layers)


def preallocate(cache: Any) -> None:
    """Swap a prefilled cache's plain layers for ones that append in place into spare capacity:
    transformers' own layer concatenates (copies) the whole cache of every layer at every step."""
    layers = getattr(cache, "layers", None)
    if not layers or not joinable_cache(cache):
        return
    for i, layer in enumerate(layers):
        if type(layer).__name__ == "DynamicLayer" and layer.is_initialized:
            layers[i] = GrowableLayer.from_layer(layer)


class GrowableLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of buffers with room to grow: a decode
    step writes its column in place, and dropping rows or leading columns (`keep_rows`) moves
    only the rows after the first one dropped. Assigning `keys`/`values` (as Batch.merge does)
    copies into a fresh buffer with spare room."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
        self._lengths = {"keys": 0, "values": 0}
        self._starts = {"keys": 0, "values": 0}  # leading columns dropped, still in the buffer
        super().__init__()

    @classmethod
    def from_layer(cls, layer: Any) -> GrowableLayer:
        new = cls()
        new.device, new.is_initialized = layer.device, True
        new.keys, new.values = layer.keys, layer.values
        return new

    def _get(self, name: str) -> torch.Tensor | None:
        buf = self._bufs[name]
        return None if buf is None else buf[:, :, self._starts[name]:self._lengths[name]]

    def _set(self, name: str, tensor: torch.Tensor | None) -> None:
        self._starts[name] = 0
        if tensor is None or tensor.dim() != 4:  # reset, or lazy initialisation's empty tensor
            self._bufs[name], self._lengths[name] = None, 0
            return
        length = tensor.shape[2]
        buf = tensor.new_zeros((*tensor.shape[:2], length + _spare(length), tensor.shape[3]))
        buf[:, :, :length] = tensor
        self._bufs[name], self._lengths[name] = buf, length

    def keep_rows(self, indices: list[int], start: int) -> None:
        """Keep rows `indices` (ascending) and the columns from `start` on, in place."""
        moved = next((j for j, i in enumerate(indices) if i != j), len(indices))
        for name in ("keys", "values"):
            buf = self._bufs[name]
            if buf is None:
                continue
            first, end = self._starts[name], self._lengths[name]
            if moved < len(indices):
                rows = torch.tensor(indices[moved:], device=buf.device)
                buf[moved:len(indices), :, first:end] = buf[:, :, first:end].index_select(0, rows)
            self._bufs[name] = buf[:len(indices)]
            self._starts[name] = first + start

    def drop_last(self, columns: int) -> None:
        """Forget the last `columns` columns appended (a step that failed after appending them)."""
        for name in ("keys", "values"):
            self._lengths[name] -= columns

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
        """(keys, values, first, end): the whole buffers, whose columns first..end-1 are the cache
        (those before `first` were dropped but hold finite numbers); None before the first update."""
        keys, values = self._bufs["keys"], self._bufs["values"]
        if keys is None or values is None or self._starts["keys"] != self._starts["values"]:
            return None
        return keys, values, self._starts["keys"], self._lengths["keys"]

    keys = property(lambda self: self._get("keys"), lambda self, t: self._set("keys", t))
    values = property(lambda self: self._get("values"), lambda self, t: self._set("values", t))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        for name, new in (("keys", key_states), ("values", value_states)):
            buf, start = self._bufs[name], self._lengths[name]
            if buf is None:
                self._set(name, new)
                continue
            end = start + new.shape[2]
            # Full (one column always stays free: compiled_step.py's graphs assume room beyond the
            # cache): move into a larger buffer, without the dropped columns.
            if end >= buf.shape[2]:
                first = self._starts[name]
                start, end = start - first, end - first
                grown = buf.new_zeros((*buf.shape[:2], end + _spare(end), buf.shape[3]))
                grown[:, :, :start] = buf[:, :, first:first + start]
                self._bufs[name] = buf = grown
                self._starts[name] = 0
            buf[:, :, start:end] = new
            self._lengths[name] = end
        return self.keys, self.values


def _spare(length: int) -> int:
    """Room to grow: half again, at least 64 columns (one reallocation per ~64+ steps)."""
    return max(64, length // 2)


# A prefill left-pads its rows to the longest; padding beyond this share of the real tokens costs
# more than the extra forward pass that prefilling the rows apart would.
MAX_PADDING_SHARE = 0.25


def prefill_groups(streams: list[Stream]) -> list[list[Stream]]:
    """Split newly admitted rows into groups prefilled together: rows sorted by context length,
    a group grows while its left padding stays within MAX_PADDING_SHARE of its tokens."""
    ordered = sorted(streams, key=lambda s: len(s.row.prompt_ids) + len(s.output.token_ids))
    groups: list[list[Stream]] = []
    tokens = 0
    for stream in ordered:
        length = len(stream.row.prompt_ids) + len(stream.output.token_ids)
        if groups and length * (len(groups[-1]) + 1) <= (1 + MAX_PADDING_SHARE) * (tokens + length):
            groups[-1].append(stream)
            tokens += length
        else:
            groups.append([stream])
            tokens = length
    return groups
