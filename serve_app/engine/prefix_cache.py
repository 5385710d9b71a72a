"""Prompt prefixes seen before, with their KV cache: a new row whose prompt starts the same way
(a chat template's system prompt, a shared instruction, the same conversation one turn later) is
prefilled from where the shared part ends. Bounded in bytes, least recently used evicted first.

Keys and values are stored per layer as [1, heads, tokens, head_dim], after rotary embedding at
positions 0..n-1: a prefix's cache does not depend on what follows it, nor on the column it
lands in (every row carries its own position ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from serve_app.cache import BoundedCache

# Reusing fewer tokens than this saves less than the bookkeeping costs.
MIN_PREFIX_TOKENS = 16
# Prompts kept at most (each lookup compares against all of them); bytes bound them first.
MAX_PREFIXES = 256

Layers = list[tuple[torch.Tensor, torch.Tensor]]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix (binary search over C-speed slice comparisons)."""
    a, b = tuple(a), tuple(b)  # a list slice never equals a tuple slice
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def layers_bytes(layers: Layers) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: BoundedCache[tuple[int, ...], Layers] = BoundedCache(MAX_PREFIXES, max_bytes, layers_bytes)
        self.tokens_reused = 0

    def find(self, contexts: Sequence[list[int]]) -> tuple[tuple[int, ...], int] | None:
        """The entry sharing the longest prefix with every context, and that length; each
        context keeps at least one token to prefill (its logits are needed)."""
        if not len(self.entries) or not contexts:
            return None
        shortest = min(len(c) for c in contexts) - 1
        tokens = [tuple(c) for c in contexts]
        best: tuple[tuple[int, ...], int] | None = None
        for key in reversed(list(self.entries)):  # most recent first
            length = min(shortest, *(common_prefix(key, c) for c in tokens))
            if length >= MIN_PREFIX_TOKENS and (best is None or length > best[1]):
                best = (key, length)
        stats = self.entries.stats
        if best is None:
            stats.misses += 1
            return None
        self.entries.touch(best[0])
        stats.hits += 1
        self.tokens_reused += best[1] * len(contexts)
        return best

    def layers(self, key: tuple[int, ...], length: int, rows: int) -> Layers:
        """The entry's first `length` tokens, for `rows` rows."""
        found = self.entries.peek(key)
        assert found is not None, "a prefix found is used before anything else is added"
        return [(k[:, :, :length].expand(rows, -1, -1, -1).contiguous(),
                 v[:, :, :length].expand(rows, -1, -1, -1).contiguous()) for k, v in found]

    def add(self, tokens: list[int], layers: Layers) -> None:
        key = tuple(tokens)
        if key in self.entries or len(key) < MIN_PREFIX_TOKENS or layers_bytes(layers) > self.max_bytes:
            return
        self.entries.put(key, layers)

    def clear(self) -> None:
        self.entries.clear()

    def stats(self) -> dict[str, Any]:
        stats = self.entries.stats
        return {"entries": stats.entries, "bytes": stats.bytes, "max_bytes": self.max_bytes, "hits": stats.hits,
                "misses": stats.misses, "tokens_reused": self.tokens_reused}
