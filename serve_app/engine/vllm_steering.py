"""Our row policies inside vLLM's sampler (`engine: vllm`): for a constrained row, a logits
processor runs, before vLLM samples, exactly what our decode loop runs after its forward pass:
the constraint's mask (our matcher), penalties, the checks' bans, our sampling (the row's seed,
temperature, top-k/p, min-p), then the policies (closing, the checks, the matcher, EOS, stop
strings, the budget). The token they settle on is the only one left in the row's logits, so
vLLM's own sampler (greedy for these rows) takes it; nothing after a processor revives a -inf.

vLLM cannot take a token back. When the checks want to (a value that fails from its start), the
row's own state rolls back (matcher, scan, closer, output), the vLLM request ends on the model's
end-of-sequence token, and the engine resubmits the prompt with the tokens kept as a new request
(vLLM's prefix cache makes its prefill cheap); the row's state goes on where it was.

The processor sees the rows of this process: vLLM's engine runs in the replica's process, one
worker (tensor parallel 1). With more workers the rows are in other processes; the engine then
leaves closing and checks out (said in `approximated`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, cast

import torch

from serve_app.engine.checked_steps import TAKEN_BACK, advance_checked, roll_back_row
from serve_app.engine.policies import CLOSED, RowPolicy, TokenStep, constraint_bitmask, row_policies
from serve_app.engine.sampling import new_generator, next_tokens, token_logprobs
from serve_app.engine.stream import Stream

# SamplingParams.extra_args key naming a steered row (its id in the engine's registry).
ROW_KEY = "serve_app_row"


class Steering:
    """One constrained row's policies, run in vLLM's sampler at every step of its request."""

    def __init__(self, stream: Stream, policies: list[RowPolicy], decode: Callable[[list[int]], str],
                 vocab_size: int, eos: int) -> None:
        self.stream, self.policies, self.decode, self.vocab_size, self.eos = stream, policies, decode, vocab_size, eos
        self.generator = new_generator(stream.row.seed)
        self.verdict: str | None = None  # the finish reason the policies gave
        self.error: Exception | None = None
        self.restart()

    def restart(self) -> None:
        """A new vLLM request for the row (first, or resubmitted with the tokens kept): its prompt
        is the row's context."""
        self.prompt_tokens = len(self.stream.context_ids())
        self.sent = 0  # tokens this request was given (its output length, once vLLM appends them)
        self.pending: int | None = None  # the last of them
        self.ending = False  # the request ends at its last token (the engine aborts it, or vLLM stops on EOS)
        self.resubmit = False  # it ends because tokens were taken back: the engine resubmits the row

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        """The V1 runner's per-request hook (AdapterLogitsProcessor; its apply is ours, batched)."""
        return self.steer(logits, len(output_ids))

    def steer(self, logits: torch.Tensor, kept: int) -> torch.Tensor:
        """`logits` (one row, whose request has `kept` output tokens) left with the one token the
        row takes next (steer_rows for one row)."""
        steer_rows([self], [kept], logits[None])
        return logits

    def held(self, kept: int) -> int | None | bool:
        """Before sampling: the token to leave without advancing the row (EOS once it ends; the
        same token again for a sample vLLM discards, a partial prefill's, which sees fewer tokens
        kept than were sent), False to leave the logits alone, or None: the row advances."""
        if self.ending or self.stream.done.is_set():
            return self.eos
        if kept < self.sent:
            return False if self.pending is None else self.pending
        if kept > self.sent:
            self._fail(RuntimeError(f"vLLM's request has {kept} tokens; the row gave it {self.sent}"))
            return self.eos
        return None

    def settle(self, token: int | None, working: torch.Tensor, logprobs: torch.Tensor | None) -> int:
        """The sampled token through the row's policies (working: its masked logits, for a check's
        retry): the token vLLM takes (EOS where the request ends here)."""
        stream = self.stream
        before, preludes = len(stream.output.token_ids), stream.output.prelude_tokens
        try:
            verdict = advance_checked(TokenStep(stream, token, logprobs=logprobs), self.policies, self.decode,
                                      working, self.generator, self._take_back)
        except Exception as error:  # noqa: BLE001 - this row fails alone; the batch goes on
            return self._fail(error)
        if verdict is TAKEN_BACK:
            self.ending = self.resubmit = True
            return self._sent(self.eos)
        if verdict == CLOSED:
            stream.output.accepted = stream.output.closed_early = True
            verdict = "stop"
        # A prelude that ended on this token moved its tokens into the context (engine/prelude.py).
        appended = stream.row.prompt_ids[-1:] if stream.output.prelude_tokens != preludes \
            else stream.output.token_ids[before:]
        if verdict is not None:
            self.verdict, self.ending = verdict, True
        return self._sent(appended[-1] if appended else self.eos)

    def _sent(self, token: int) -> int:
        self.sent, self.pending = self.sent + 1, token
        return token

    def _fail(self, error: Exception) -> int:
        self.error, self.ending = error, True
        return self._sent(self.eos)

    def _take_back(self, stream: Stream, tokens: int) -> bool:
        return roll_back_row(stream, tokens, self.decode)


def steer_rows(steerings: list[Steering], kept: list[int], logits: torch.Tensor,
               rows: list[int] | None = None) -> None:
    """Leave in each of `rows` of `logits` (default: all, in order) the one token its row takes
    next, in place: the rows that advance are masked, penalised and sampled together, as our
    decode loop does a batch, then each goes through its policies."""
    rows = list(range(len(steerings))) if rows is None else rows
    forced: list[tuple[int, int]] = []
    live: list[tuple[int, Steering]] = []
    for steering, count, row in zip(steerings, kept, rows, strict=True):
        held = steering.held(count)
        if held is None:
            live.append((row, steering))
        elif held is not False:
            forced.append((row, int(held)))
    if live:
        forced += _advance(live, logits)
    for row, token in forced:
        _only(logits[row], token)


def _advance(live: list[tuple[int, Steering]], logits: torch.Tensor) -> list[tuple[int, int]]:
    vocab = live[0][1].vocab_size
    streams = [steering.stream for _, steering in live]
    working = logits[torch.tensor([row for row, _ in live]), :vocab].float()  # a copy
    try:
        tokens = next_tokens(working, streams, constraint_bitmask(streams, vocab),
                             [steering.generator for _, steering in live], vocab)
        logprobs = token_logprobs(working, streams)
    except Exception as error:  # noqa: BLE001 - the batch's rows fail, vLLM's batch goes on
        return [(row, steering._fail(error)) for row, steering in live]
    return [(row, steering.settle(token, working[i], logprobs[i]))
            for i, ((row, steering), token) in enumerate(zip(live, tokens, strict=True))]


def _only(logits: torch.Tensor, token: int) -> torch.Tensor:
    """`logits` (one row, changed in place) with every token but `token` at -inf."""
    value = float(logits[token])
    logits.fill_(-torch.inf)
    logits[token] = value if value > -torch.inf else 0.0
    return logits


class SteeredRows:
    """The rows an engine steers, by id: registered before vLLM sees their request, gone when it
    finishes. Bounded by the rows vLLM runs at once (its scheduler's max_num_seqs)."""

    def __init__(self) -> None:
        self._rows: dict[str, Steering] = {}
        self._lock = threading.Lock()

    def add(self, key: str, steering: Steering) -> None:
        with self._lock:
            self._rows[key] = steering

    def get(self, key: str) -> Steering | None:
        with self._lock:
            return self._rows.get(key)

    def pop(self, key: str) -> Steering | None:
        with self._lock:
            return self._rows.pop(key, None)

    def __len__(self) -> int:
        return len(self._rows)


def steering_processor(rows: SteeredRows, v2: bool = False) -> type[Any]:
    """A logits processor class that steers `rows` (vLLM instantiates it itself): for the V1
    model runner (the CPU build's), or Model Runner V2 (the default where Triton is)."""
    return _v2_processor(rows) if v2 else _v1_processor(rows)


def _steering_for(rows: SteeredRows, params: Any) -> Steering | None:
    key = (params.extra_args or {}).get(ROW_KEY)
    return rows.get(key) if isinstance(key, str) else None


def _v1_processor(rows: SteeredRows) -> type[Any]:
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class ServeAppSteering(AdapterLogitsProcessor):
        """vLLM keeps, per batch index, our Steering with a live reference to the request's output
        ids (AdapterLogitsProcessor's bookkeeping); apply steers them all at once."""

        def is_argmax_invariant(self) -> bool:
            return False  # it decides the token

        def new_req_logits_processor(self, params: Any) -> Steering | None:
            return _steering_for(rows, params)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if self.req_info:
                indices = list(self.req_info)
                hooks = [self.req_info[i] for i in indices]  # partial(steering, output_ids)
                steer_rows([cast(Steering, h.func) for h in hooks], [len(h.args[0]) for h in hooks], logits, indices)
            return logits

    return ServeAppSteering


def _v2_processor(rows: SteeredRows) -> type[Any]:
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor

    class ServeAppSteeringV2(LogitsProcessor):
        """Per request slot (slots are recycled: add_request overwrites). A row's output length is
        its position + 1 - its prompt's length; a partial prefill's sample is below what was sent."""

        def __init__(self, vllm_config: Any, req_states: Any) -> None:
            self.slots: dict[int, tuple[Steering, int]] = {}

        def add_request(self, req_idx: int, sampling_params: Any) -> bool:
            steering = _steering_for(rows, sampling_params)
            if steering is None:
                self.slots.pop(req_idx, None)
                return False
            self.slots[req_idx] = (steering, steering.prompt_tokens)
            return True

        def apply(self, logits: torch.Tensor, ctx: Any) -> torch.Tensor:
            if not self.slots:
                return logits
            picked, steerings, kept = [], [], []
            for row, (slot, position) in enumerate(zip(ctx.expanded_idx_mapping.tolist(), ctx.pos.tolist(),
                                                       strict=True)):
                entry = self.slots.get(slot)
                if entry is not None:
                    picked.append(row)
                    steerings.append(entry[0])
                    kept.append(position + 1 - entry[1])
            if picked:
                steer_rows(steerings, kept, logits, picked)
            return logits

    return ServeAppSteeringV2


def new_steering(stream: Stream, decode: Callable[[list[int]], str], eos_ids: set[int], vocab_size: int,
                 eos: int) -> Steering:
    return Steering(stream, row_policies(eos_ids, decode), decode, vocab_size, eos)
