"""From a batch's logits to one token per row: penalties and logit_bias, the constraint bitmask,
the n-gram ban, then greedy or seeded sampling. In that order: penalties and biases reorder
allowed tokens and never allow one; the ban never leaves a row with nothing allowed."""

from __future__ import annotations

import torch

from serve_app.engine.stream import Row, Stream

# Below this, dividing logits by the temperature overflows to inf/NaN (found by fuzzing with
# temperature=7.6e-285): sample greedily, which is what such a temperature means anyway.
MIN_TEMPERATURE = 1e-4


def next_tokens(logits: torch.Tensor, streams: list[Stream], bitmask: torch.Tensor | None,
                generators: list[torch.Generator], vocab_size: int) -> list[int | None]:
    """One token per row (None where the constraint allows nothing); `logits` is changed."""
    if logits.shape[-1] > vocab_size:  # padded embedding rows are not real tokens
        logits[:, vocab_size:] = -torch.inf
    apply_penalties(logits, streams)
    apply_logit_bias(logits, streams)
    if bitmask is not None:
        apply_bitmask(logits, bitmask.to(logits.device))
    apply_check_bans(logits, streams)
    ban_repeated_ngrams(logits, streams)
    return sample_tokens(logits, [s.row for s in streams], generators)


def sample_tokens(logits: torch.Tensor, rows: list[Row], generators: list[torch.Generator]) -> list[int | None]:
    """One token per row; None where every token is masked out. Greedy rows in one argmax."""
    finite = torch.isfinite(logits).any(dim=-1).tolist()
    greedy = torch.argmax(logits, dim=-1).tolist()
    out: list[int | None] = []
    for i, row in enumerate(rows):
        if not finite[i]:
            out.append(None)
        elif row.temperature < MIN_TEMPERATURE:
            out.append(int(greedy[i]))
        else:
            out.append(_sample_row(logits[i], row, generators[i]))
    return out


def _sample_row(logits: torch.Tensor, row: Row, generator: torch.Generator) -> int:
    if row.top_k > 0 and row.top_k < logits.shape[-1]:  # keep the k largest (ties at the k-th kept too)
        kth = torch.topk(logits, row.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    probs = torch.softmax(logits / row.temperature, dim=-1)
    if not torch.isfinite(probs).all():  # extreme logits: fall back to the most likely token
        return int(torch.argmax(logits))
    if row.min_p > 0.0:  # relative to the most likely token; that one always stays
        probs = probs.masked_fill(probs < row.min_p * probs.max(), 0.0)
    top_p = row.top_p
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        beyond = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > top_p
        sorted_probs[beyond] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def token_logprobs(logits: torch.Tensor, streams: list[Stream]) -> list[torch.Tensor | None]:
    """Per row that asked for logprobs, the log-softmax of its logits as `next_tokens` left them
    (penalties applied, disallowed tokens at -inf): what the constrained decode chose from, before
    temperature and top-k/top-p/min-p."""
    out: list[torch.Tensor | None] = [None] * len(streams)
    for i, stream in enumerate(streams):
        if stream.row.logprobs is not None:
            out[i] = torch.log_softmax(logits[i], dim=-1)
    return out


def logprob_entry(logprobs: torch.Tensor, token: int, top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """(token, its logprob, the `top` most likely (token, logprob) with a finite logprob)."""
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        alternatives = [(int(t), float(v)) for t, v in zip(ids.tolist(), values.tolist(), strict=True)
                        if v != -float("inf")]
    return token, float(logprobs[token]), alternatives


def new_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % 2**63)  # torch takes [0, 2**64); negatives map into it
    return generator


def apply_penalties(logits: torch.Tensor, streams: list[Stream]) -> None:
    """Repetition (over prompt and output, as in transformers and vLLM), frequency and presence
    (over the output, as in OpenAI's API) penalties, in place, for the rows that ask."""
    width = logits.shape[-1]
    for i, stream in enumerate(streams):
        row, generated = stream.row, stream.output.token_ids
        if not row.penalized:
            continue
        if row.repetition_penalty != 1.0:
            seen = torch.tensor([t for t in row.prompt_token_set.union(generated) if t < width], dtype=torch.long)
            values = logits[i, seen]
            logits[i, seen] = torch.where(values > 0, values / row.repetition_penalty,
                                          values * row.repetition_penalty)
        if generated and (row.frequency_penalty or row.presence_penalty):
            ids, counts = torch.unique(torch.tensor(generated, dtype=torch.long), return_counts=True)
            keep = ids < width
            logits[i, ids[keep]] -= row.frequency_penalty * counts[keep].to(logits.dtype) + row.presence_penalty


def apply_logit_bias(logits: torch.Tensor, streams: list[Stream]) -> None:
    """Each row's logit_bias, added in place (before the mask: a bias never allows a token)."""
    for i, stream in enumerate(streams):
        items = [(token, value) for token, value in (stream.row.logit_bias or {}).items() if token < logits.shape[-1]]
        if items:
            ids = torch.tensor([token for token, _ in items], dtype=torch.long, device=logits.device)
            logits[i, ids] += torch.tensor([value for _, value in items], dtype=logits.dtype, device=logits.device)


def apply_check_bans(logits: torch.Tensor, streams: list[Stream]) -> None:
    """Forbid the tokens a check refused at this position of a row (serve_app/constraints/checks.py)."""
    for i, stream in enumerate(streams):
        checker = stream.row.checker
        if checker is not None and checker.bans:
            banned = checker.banned(len(stream.output.token_ids))
            if banned:
                logits[i, torch.tensor(sorted(banned), dtype=torch.long)] = -torch.inf


def ban_repeated_ngrams(logits: torch.Tensor, streams: list[Stream]) -> None:
    """Forbid tokens that would repeat an n-gram of the output (``no_repeat_ngram_size``), after
    the constraint's mask; a row the ban would leave with no allowed token keeps its mask."""
    for i, stream in enumerate(streams):
        n, generated = stream.row.no_repeat_ngram_size, stream.output.token_ids
        if n <= 0 or len(generated) < n - 1:
            continue
        tail = generated[len(generated) - n + 1:] if n > 1 else []
        banned = sorted({generated[j + n - 1] for j in range(len(generated) - n + 1)
                         if generated[j:j + n - 1] == tail})
        if not banned:
            continue
        index = torch.tensor(banned, dtype=torch.long)
        saved = logits[i, index].clone()
        logits[i, index] = -torch.inf
        if not torch.isfinite(logits[i]).any():
            logits[i, index] = saved


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set every token a row's bitmask disallows to -inf, for the whole batch at once."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().view(bitmask.shape[0], -1)
    width = min(allowed.shape[1], logits.shape[1])
    logits[:, :width].masked_fill_(~allowed[:, :width], -torch.inf)
    if logits.shape[1] > width:
        logits[:, width:] = -torch.inf
