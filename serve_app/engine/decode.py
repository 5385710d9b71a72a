"""The decode loop: a batch of rows, each with its own prompt length, constraint processor and
sampling parameters. Left padding + attention mask + explicit position ids; one KV cache."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Row:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    processor: Any = None  # an Outlines logits processor for this row alone, or None


@dataclass
class RowOutput:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "running"  # then "stop" or "length"
    first_token_s: float | None = None


def _left_padded(rows: list[Row], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids, dtype=torch.long)
        mask[i, width - len(row.prompt_ids):] = 1
    return ids.to(device), mask.to(device)


def sample_token(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | None) -> int | None:
    """One token id from a 1-D row of logits; None when every token is masked out."""
    if not torch.isfinite(logits).any():
        return None
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        beyond = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > top_p
        sorted_probs[beyond] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _stop_hit(text: str, stops: list[str]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


def _cache_keyword(model: Any) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def decode_batch(model: Any, decode_text: Callable[[list[int]], str], rows: list[Row], pad_id: int,
                 eos_ids: set[int], vocab_size: int, clock: Callable[[], float]) -> list[RowOutput]:
    """Generate for every row until each hits EOS, a stop string or its token budget."""
    device = model.device
    ids, mask = _left_padded(rows, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    history = ids.cpu()  # what each row's processor sees as "the sequence so far"
    outputs = [RowOutput() for _ in rows]
    active = set(range(len(rows)))
    generators = [_generator(r.seed) for r in rows]
    started, cache, step_ids = clock(), None, ids
    cache_kw = _cache_keyword(model)
    for _step in range(max(r.max_new_tokens for r in rows)):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                    use_cache=True, **{cache_kw: cache})
        cache = out[cache_kw]  # the output names the cache like the input does
        logits = out.logits[:, -1, :].float()
        if logits.shape[-1] > vocab_size:  # padded embedding rows are not real tokens
            logits[:, vocab_size:] = -torch.inf
        next_ids = torch.full((len(rows),), pad_id, dtype=torch.long)
        for i in sorted(active):
            next_ids[i] = _advance_row(rows[i], outputs[i], logits[i:i + 1], history[i:i + 1],
                                       generators[i], decode_text, eos_ids, clock() - started)
            if outputs[i].finish_reason != "running":
                active.discard(i)
        if not active:
            break
        history = torch.cat([history, next_ids[:, None]], dim=1)
        step_ids = next_ids[:, None].to(device)
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
    return outputs


def _advance_row(row: Row, out: RowOutput, logits: torch.Tensor, history: torch.Tensor,
                 generator: torch.Generator, decode_text: Callable[[list[int]], str],
                 eos_ids: set[int], elapsed: float) -> int:
    """Pick this row's next token and update its output; returns the token fed back."""
    if row.processor is not None:
        logits = row.processor(history.to(logits.device), logits)
    token = sample_token(logits[0], row.temperature, row.top_p, generator)
    if out.first_token_s is None:
        out.first_token_s = elapsed
    if token is None:  # the constraint allows nothing: the output is incomplete
        out.finish_reason = "length"
        return 0
    if token in eos_ids:
        out.finish_reason = "stop"
        return token
    out.token_ids.append(token)
    out.text = decode_text(out.token_ids)
    cut = _stop_hit(out.text, row.stop)
    if cut is not None:
        out.text, out.finish_reason = out.text[:cut], "stop"
    elif len(out.token_ids) >= row.max_new_tokens:
        out.finish_reason = "length"
    return token
