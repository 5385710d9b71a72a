"""Jump-forward: tokens the grammar forces are appended without sampling, and several of a row's
tokens go through one forward pass.

After a row's sampled token, its matcher reports the tokens that must follow whatever the model
prefers (llguidance's `compute_ff_tokens`: a key's text, `":`, the `","` between fields, an enum's
tail; trimmed by llguidance where the tokenization of what follows could differ), or, once the
closer has begun closing the row's JSON within its budget, the rest of the closer's completion
(the row then ends without another forward pass). They are appended at once, through the row's
policies like any sampled token (closing, stop strings, the budget), and streamed as they are
appended. Rows with logprobs take none, and rows with checks while generating only the closer's:
a refused or scored token needs the logits at its own position.

The decode step then feeds each row the tokens of its context not yet in the KV cache: one for a
row that sampled, more for a row that jumped. The block is as wide as `feed_width` decides
(right-aligned, padding columns masked out, each row its own positions); a row with tokens left
over is fed the rest at the next step and samples only when all its tokens are in the cache.
Feeding a token costs a share of a forward pass, so the width is chosen per step by a cost model:
`fixed + rows x width` token slots against the real tokens fed.
"""

from __future__ import annotations

import torch

from serve_app.engine.stream import Stream

# A forward pass costs about this many token slots beyond the batch's rows x width. Measured on
# SmolLM2-135M in bfloat16 on 2 CPU cores with a 60-column cache: 16 rows 63 ms at width 1, 75 at
# 2, 121 at 4, 197 at 8 (~1.2 ms a slot, ~36 slots fixed); 2 rows 37 ms at width 1, 59 at 8 (~22
# slots fixed). In make bench's batch of 16 constrained rows, 16 beat 48 (P2 0.94 against 0.90,
# three runs each): a narrower block wastes fewer padding slots. On a GPU the fixed share is
# larger; wider blocks win.
FIXED_COST_SLOTS = 16
# With the step compiled (one token a row), an eager wider pass instead where it feeds more tokens
# per cost: a compiled step costs about COMPILED_FIXED_SLOTS + rows / 2 slots, an eager pass about
# EAGER_FIXED_SLOTS + rows x width. Measured as above: compiled 21 ms at 1-2 rows, 30 at 16; eager
# 37 ms for 2 rows at width 1, 59 at 8. So it is the tail of a batch (a few rows left, one of them
# jumped) that goes eager; a full batch stays compiled.
COMPILED_FIXED_SLOTS = 17
EAGER_FIXED_SLOTS = 30
# Forced tokens appended after one sampled token, at most (a long `const` is fed over several steps).
MAX_FORCED_PER_TOKEN = 256


def forced_tokens(stream: Stream, limit: int) -> list[int]:
    """The tokens the row's grammar forces next (at most `limit`; none where the row cannot jump)."""
    row = stream.row
    if limit <= 0 or row.matcher is None or row.logprobs is not None:
        return []
    room = row.max_new_tokens - len(stream.output.token_ids)
    if row.closer is not None and row.closer.closed_early:
        # The closer's completion: fixed when closing began, and no check runs while it is written.
        return list(row.closer.forced)[:min(limit, room)]
    forced = getattr(row.matcher, "forced_tokens", None)
    if forced is None or row.checker is not None:
        return []
    return list(forced())[:min(limit, room)]


def uncached(stream: Stream, cached: int) -> list[int]:
    """The row's context tokens after its first `cached` (those in the KV cache)."""
    prompt = stream.row.prompt_ids
    if cached >= len(prompt):
        return stream.output.token_ids[cached - len(prompt):]
    return prompt[cached:] + stream.output.token_ids


def feed_width(lengths: list[int], cap: int) -> int:
    """How many columns this step feeds: the width (at most `cap`) with the most real tokens per
    token slot of cost; the narrowest among equals."""
    best, best_score = 1, 0.0
    for width in range(1, max(1, min(cap, max(lengths))) + 1):
        real = sum(min(n, width) for n in lengths)
        score = real / (FIXED_COST_SLOTS + len(lengths) * width)
        if score > best_score * (1 + 1e-9):
            best, best_score = width, score
    return best


def step_width(lengths: list[int], cap: int, compiled: bool) -> int:
    """`feed_width`, and with a compiled one-token step: 1 (that step) unless an eager pass that wide
    feeds more tokens per cost."""
    width = feed_width(lengths, cap)
    if not compiled or width == 1:
        return width
    eager = sum(min(n, width) for n in lengths) / (EAGER_FIXED_SLOTS + len(lengths) * width)
    return width if eager > len(lengths) / (COMPILED_FIXED_SLOTS + len(lengths) / 2) else 1


def block(tails: list[list[int]], width: int, positions: list[int], pad_id: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """The step's input ids, attention-mask columns and position ids, each row's first `width`
    uncached tokens right-aligned; and how many each row feeds."""
    rows = len(tails)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    where = torch.tensor(positions, dtype=torch.long)[:, None].repeat(1, width)
    fed = []
    for i, tail in enumerate(tails):
        tokens = tail[:width]
        n = len(tokens)
        ids[i, width - n:] = torch.tensor(tokens, dtype=torch.long)
        mask[i, width - n:] = 1
        where[i, width - n:] += torch.arange(n)
        fed.append(n)
    return ids, mask, where, fed
