"""Prompt prefixes seen before, with their KV cache: a new row whose prompt starts the same way
(a chat template's system prompt, a shared instruction, the same conversation one turn later) is
prefilled from where the shared part ends; each row of a prefill finds its own entry. Each
prefilled prompt becomes an entry, except one that adds only a few tokens to its entry, which
waits until it comes again (`worth_keeping`). Bounded in bytes and in entries (eviction below).

Keys and values are stored per layer as [1, heads, tokens, head_dim], after rotary embedding at
positions 0..n-1: a prefix's cache does not depend on what follows it, nor on the column it
lands in (every row carries its own position ids).

Eviction is segmented: a prompt another row has mostly reused is hot, and the others go first
(least recently used first), so a run of one-off prompts cannot push out the few that every
request shares; hot ones go first only while they hold over HOT_SHARE of the bytes, so new
prompts still get in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from serve_app.cache import BoundedCache

# Reusing fewer tokens than this saves less than the bookkeeping costs.
MIN_PREFIX_TOKENS = 16
# Prompts kept at most (each lookup compares against all of them); bytes bound them first.
MAX_PREFIXES = 256
# A prompt is hot once a row has reused this share of its tokens (the same prompt again, the next
# turn of its conversation); sharing its start (a system prompt all of them have) does not make it.
HOT_REUSE = 0.9
# The share of the bytes hot prompts may hold and still be evicted after the others.
HOT_SHARE = 0.75
# A prompt that adds fewer than MIN_PREFIX_TOKENS to the entry it was prefilled from (the same
# question with another number or name) is kept only once it comes a second time: kept at once,
# a stream of one-off prompts like it pushed out the ones that repeat (bench-peers, served: the
# 24 schema prompts between rounds of 96 such prompts, schemas p50 4.16 s against 2.51 s). The
# prompts seen once are remembered by hash, this many at most.
SEEN_ONCE_KEPT = 4096

Layers = list[tuple[torch.Tensor, torch.Tensor]]
Hit = tuple[tuple[int, ...], int] | None  # (an entry's key, tokens of it reused)


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
        self.hot: set[tuple[int, ...]] = set()  # keys of entries a row has reused (HOT_REUSE of them)
        self.seen_once: OrderedDict[int, None] = OrderedDict()  # hashes of short additions seen once

    def find(self, context: Sequence[int]) -> Hit:
        """The entry sharing the longest prefix with the context, and that length; the context
        keeps at least one token to prefill (its logits are needed)."""
        if not len(self.entries):
            return None
        best = self.longest(context)
        stats = self.entries.stats
        if best is None:
            stats.misses += 1
            return None
        self.entries.touch(best[0])
        if best[1] >= HOT_REUSE * len(best[0]):  # not a system prompt that every entry starts with
            self.hot.add(best[0])
        stats.hits += 1
        self.tokens_reused += best[1]
        return best

    def longest(self, context: Sequence[int]) -> Hit:
        """What `find` would return, without counting it as a hit or a use."""
        tokens, longest = tuple(context), len(context) - 1
        best: Hit = None
        for key in reversed(list(self.entries)):  # most recent first
            length = min(longest, common_prefix(key, tokens))
            if length >= MIN_PREFIX_TOKENS and (best is None or length > best[1]):
                best = (key, length)
        return best

    def find_each(self, contexts: Sequence[Sequence[int]]) -> list[Hit]:
        """`find` for each row of a prefill: rows with different prompts reuse different entries."""
        return [self.find(context) for context in contexts]

    def rows(self, hits: Sequence[Hit]) -> Layers:
        """Per layer, each hit's first tokens as one row, left-padded (zeros) to the longest; a
        row without a hit is all padding."""
        width = max(hit[1] if hit is not None else 0 for hit in hits)
        found = [(self.entries.peek(hit[0]), hit[1]) if hit is not None else (None, 0) for hit in hits]
        sample = next(layers for layers, _ in found if layers is not None)
        out: Layers = []
        for index, (k0, v0) in enumerate(sample):
            keys = k0.new_zeros((len(hits), k0.shape[1], width, k0.shape[3]))
            values = v0.new_zeros((len(hits), v0.shape[1], width, v0.shape[3]))
            for row, (layers, length) in enumerate(found):
                if layers is not None and length:
                    keys[row, :, width - length:] = layers[index][0][0, :, :length]
                    values[row, :, width - length:] = layers[index][1][0, :, :length]
            out.append((keys, values))
        return out

    def worth_keeping(self, context: Sequence[int], reused: int) -> bool:
        """Whether a prompt just prefilled (`reused` of its tokens from an entry) should be kept:
        one that adds MIN_PREFIX_TOKENS or more, or fewer the second time it comes."""
        if len(context) - reused >= MIN_PREFIX_TOKENS:
            return True
        key = hash(tuple(context))
        if key in self.seen_once:
            del self.seen_once[key]
            return True
        self.seen_once[key] = None
        if len(self.seen_once) > SEEN_ONCE_KEPT:
            self.seen_once.popitem(last=False)
        return False

    def add(self, tokens: list[int], layers: Layers) -> None:
        key = tuple(tokens)
        size = layers_bytes(layers)
        if key in self.entries or len(key) < MIN_PREFIX_TOKENS or size > self.max_bytes:
            return
        self._make_room(size)
        self.entries.put(key, layers)

    def _make_room(self, size: int) -> None:
        """Evict until `size` more bytes and one more entry fit: the least recently used prompt
        never reused, or the least recently used hot one where no other is left or hot ones hold
        over HOT_SHARE of the bytes."""
        stats = self.entries.stats
        if stats.bytes + size <= self.max_bytes and len(self.entries) < MAX_PREFIXES:
            return
        sizes = {key: layers_bytes(layers) for key, layers in self.entries.items()}  # least recent first
        hot_bytes = sum(sizes.get(key, 0) for key in self.hot)
        while sizes and (stats.bytes + size > self.max_bytes or len(sizes) >= MAX_PREFIXES):
            cold = next((key for key in sizes if key not in self.hot), None)
            hot = next((key for key in sizes if key in self.hot), None)
            victim = cold if hot is None or (cold is not None and hot_bytes <= HOT_SHARE * self.max_bytes) else hot
            assert victim is not None  # sizes is not empty: one of them is a key
            if victim in self.hot:
                self.hot.discard(victim)
                hot_bytes -= sizes[victim]
            del sizes[victim]
            self.entries.pop(victim)
            stats.evictions += 1

    def clear(self) -> None:
        self.entries.clear()
        self.hot.clear()
        self.seen_once.clear()

    def stats(self) -> dict[str, Any]:
        stats = self.entries.stats
        return {"entries": stats.entries, "bytes": stats.bytes, "max_bytes": self.max_bytes, "hits": stats.hits,
                "misses": stats.misses, "tokens_reused": self.tokens_reused}
