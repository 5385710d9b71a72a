"""Continuous batching: one decode loop per engine, rows joining between steps and leaving when
done, each row with its own prompt length, constraint matcher and sampling parameters.

Layout: the batch's KV cache is left-padded to a common width; an attention mask hides the
padding, and each row keeps its own position ids. A newly admitted group is prefilled on its
own, then its cache is padded and concatenated to the batch's. Masks for every constrained row
are written into one int32 bitmask and applied to the batch's logits in one tensor op; they are
computed in a worker thread while the model runs the next forward pass.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F

from serve_app.engine.backends import RowMatcher
from serve_app.engine.closing import RowCloser

logger = logging.getLogger(__name__)

# Below this, dividing logits by the temperature overflows to inf/NaN (found by fuzzing with
# temperature=7.6e-285): sample greedily, which is what such a temperature means anyway.
MIN_TEMPERATURE = 1e-4

# Decoded text that ends in U+FFFD is an incomplete UTF-8 sequence: hold it back from streams.
_PARTIAL = "\ufffd"


@dataclass
class Row:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    matcher: RowMatcher | None = None
    closer: RowCloser | None = None  # closes JSON before max_new_tokens runs out
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram_size: int = 0

    @cached_property
    def prompt_token_set(self) -> frozenset[int]:
        return frozenset(self.prompt_ids)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass
class RowOutput:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "running"  # then "stop", "length" or "cancelled"
    first_token_s: float | None = None
    total_s: float = 0.0
    accepted: bool = False  # ended on EOS while constrained: the matcher allowed EOS, so it accepts
    closed_early: bool = False  # the closer forced the shortest valid completion near the budget


class Stream:
    """A submitted row: text deltas as they are generated, then the final output.

    ``events`` yields ``("delta", str)`` items and one final ``("done", RowOutput)`` (or
    ``("error", exception)``). ``notify`` (optional) is called from the decode thread for each
    event, e.g. to wake an asyncio loop."""

    def __init__(self, row: Row, notify: Callable[[tuple[str, Any]], None] | None = None) -> None:
        self.row = row
        self.output = RowOutput()
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._notify = notify
        self._sent = 0  # characters of text already emitted as deltas
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.failure: Exception | None = None  # set where computing this row's mask failed
        self.submitted_at = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()

    def context_ids(self) -> list[int]:
        """What a (re-)prefill feeds: the prompt and every token generated so far. A row
        preempted on out-of-memory resumes from here with its matcher state intact."""
        return self.row.prompt_ids + self.output.token_ids

    def emit(self, kind: str, value: Any) -> None:
        self.events.put((kind, value))
        if self._notify is not None:
            self._notify((kind, value))
        if kind in ("done", "error"):
            self.done.set()

    def emit_text(self, final: bool) -> None:
        """Emit new text, holding back what a stop string or a partial character may change."""
        text = self.output.text
        hold = 0 if final else max((len(s) - 1 for s in self.row.stop if s), default=0)
        end = len(text) - hold
        while not final and end > self._sent and text[end - 1] == _PARTIAL:
            end -= 1
        if end > self._sent:
            self.emit("delta", text[self._sent:end])
            self._sent = end

    def result(self, timeout: float | None = None) -> RowOutput:
        if not self.done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        while True:
            kind, value = self.events.get()
            if kind == "done":
                return value
            if kind == "error":
                raise value


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
            out.append(_sample_row(logits[i], row.temperature, row.top_p, generators[i]))
    return out


def _sample_row(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    probs = torch.softmax(logits / temperature, dim=-1)
    if not torch.isfinite(probs).all():  # extreme logits: fall back to the most likely token
        return int(torch.argmax(logits))
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        beyond = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > top_p
        sorted_probs[beyond] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def new_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % 2**63)  # torch takes [0, 2**64); negatives map into it
    return generator


def _stop_hit(text: str, stops: list[str]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


def cache_keyword(model: Any) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Batch:
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


class DecodeLoop:
    """Runs in one background thread per engine; `submit` is thread-safe."""

    def __init__(self, model: Any, decode_text: Callable[[list[int]], str], pad_id: int, eos_ids: set[int],
                 vocab_size: int, max_batch_size: Callable[[], int]) -> None:
        self.model = model
        self.decode_text = decode_text
        self.pad_id = pad_id
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size
        self.max_batch_size = max_batch_size
        self.cache_kw = cache_keyword(model)
        self.device = model.device
        self.waiting: queue.SimpleQueue[Stream] = queue.SimpleQueue()
        self.preempted: deque[Stream] = deque()  # rows split off on out-of-memory, resumed first
        self.cap_after_oom: int | None = None
        self.oom_events: Counter[str] = Counter()  # split, cpu_fallback, failed
        # on_oom() moves the model off the GPU (engine's CPU fallback); True if it did.
        self.on_oom: Callable[[], bool] | None = None
        # Test-only injection point: called with the batch size before every forward pass.
        self.fault_injector: Callable[[int], None] | None = None
        self.batch = _Batch()
        self.joinable = True
        self._wake = threading.Event()
        self._masker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="masks")
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.steps = 0
        self.finished: Counter[str] = Counter()  # rows by finish reason
        self.closed_early = 0  # rows the closer finished before their budget ran out

    # -- public ----------------------------------------------------------------------------------

    def submit(self, stream: Stream) -> Stream:
        if self._closed.is_set():
            stream.emit("error", _closed_error())
            return stream
        self.waiting.put(stream)
        self._wake.set()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="decode-loop")
                self._thread.start()
        return stream

    def queue_depth(self) -> tuple[int, int]:
        """(waiting, running) rows."""
        return self.waiting.qsize() + len(self.preempted), len(self.batch)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the decode thread (after its current step) and fail what it had not finished;
        joined, so no thread is left inside torch when the interpreter exits."""
        self._closed.set()
        self._wake.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        self._masker.shutdown(wait=True)
        self._fail_unfinished()

    def _fail_unfinished(self) -> None:
        unfinished = list(self.batch.streams) + list(self.preempted)
        while not self.waiting.empty():
            unfinished.append(self.waiting.get())
        self.batch.clear()
        self.preempted.clear()
        for stream in unfinished:
            if not stream.done.is_set():
                stream.emit("error", _closed_error())

    def capacity(self) -> int:
        cap = self.max_batch_size()
        return min(cap, self.cap_after_oom) if self.cap_after_oom else cap

    # -- loop ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed.is_set():
            self._admit()
            if not len(self.batch):
                if not self.preempted:
                    self.cap_after_oom = None  # memory pressure is gone with the batch
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception as error:  # fail the rows, keep the loop alive for the next ones
                rows = list(self.batch.streams)
                self.batch.clear()
                self._recover(rows, error)

    def _recover(self, rows: list[Stream], error: Exception) -> None:
        """Out of memory: split the rows and retry half later; a single row that still does not
        fit moves the model to CPU (if allowed) or fails with a 503. Other errors fail the rows."""
        from serve_app.engine.loading import is_out_of_memory, release_gpu_memory
        from serve_app.errors import OverloadedError

        if not is_out_of_memory(error):
            for stream in rows:
                stream.emit("error", error)
            return
        release_gpu_memory()
        if len(rows) > 1:
            self.oom_events["split"] += 1
            self.cap_after_oom = max(1, len(rows) // 2)
            self.preempted.extendleft(reversed(rows))
        elif self.on_oom is not None and self.on_oom():
            self.oom_events["cpu_fallback"] += 1
            self.device = self.model.device
            # Rows still running keep a KV cache on the old device: resume them on CPU too.
            running = list(self.batch.streams)
            self.batch.clear()
            self.preempted.extendleft(reversed(rows + running))
        else:
            self.oom_events["failed"] += 1
            for stream in rows:
                stream.emit("error", OverloadedError(
                    "out of memory while generating, even for this request alone; retry later",
                    code="out_of_memory"))

    def _admit(self) -> None:
        if len(self.batch) and not self.joinable:
            return
        room = self.capacity() - len(self.batch)
        group: list[Stream] = []
        while room > len(group) and (self.preempted or not self.waiting.empty()):
            stream = self.preempted.popleft() if self.preempted else self.waiting.get()
            if not stream.cancelled.is_set():
                group.append(stream)
            else:
                self._finish(stream, "cancelled")
        if group:
            try:
                self._prefill(group)
            except Exception as error:
                self._recover(group, error)

    @torch.inference_mode()
    def _prefill(self, group: list[Stream]) -> None:
        contexts = [s.context_ids() for s in group]
        width = max(len(c) for c in contexts)
        ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, context in enumerate(contexts):
            ids[i, width - len(context):] = torch.tensor(context, dtype=torch.long)
            mask[i, width - len(context):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache = out[self.cache_kw]
        self.joinable = joinable_cache(cache)
        first = len(self.batch)
        self.batch.merge(group, cache, mask)
        logits = out.logits[:, -1, :].float()
        bitmask = self._masks(group)
        self._sample_and_advance(logits, bitmask, range(first, first + len(group)))

    @torch.inference_mode()
    def _step(self) -> None:
        batch = self.batch
        assert batch.mask is not None
        tokens = torch.tensor([s.output.token_ids[-1] for s in batch.streams], dtype=torch.long)
        # The masks for this step depend only on the tokens already sampled: compute them while
        # the model runs.
        pending = self._masker.submit(self._masks, list(batch.streams))
        batch.mask = torch.cat([batch.mask, torch.ones((len(batch), 1), dtype=batch.mask.dtype,
                                                        device=batch.mask.device)], dim=1)
        positions = torch.tensor(batch.positions, dtype=torch.long)[:, None].to(self.device)
        out = self._forward(input_ids=tokens[:, None].to(self.device), attention_mask=batch.mask,
                            position_ids=positions, use_cache=True, **{self.cache_kw: batch.cache})
        batch.cache = out[self.cache_kw]
        batch.positions = [p + 1 for p in batch.positions]
        self.steps += 1
        self._sample_and_advance(out.logits[:, -1, :].float(), pending.result(), range(len(batch)))

    def _forward(self, **inputs: Any) -> Any:
        if self.fault_injector is not None:
            self.fault_injector(int(inputs["input_ids"].shape[0]))
        return self.model(**inputs)

    def _masks(self, streams: list[Stream]) -> torch.Tensor | None:
        """One int32 bitmask row per stream (all ones for unconstrained rows)."""
        if all(s.row.matcher is None for s in streams):
            return None
        width = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(streams), width), -1, dtype=torch.int32)
        for i, stream in enumerate(streams):
            matcher = stream.row.matcher
            if matcher is None:
                continue
            try:
                _fill_row(bitmask, i, matcher, width)
            except Exception as error:  # fails this row when it advances, not the batch
                stream.failure = error
        return bitmask

    def _sample_and_advance(self, logits: torch.Tensor, bitmask: torch.Tensor | None, rows: range) -> None:
        if logits.shape[-1] > self.vocab_size:  # padded embedding rows are not real tokens
            logits[:, self.vocab_size:] = -torch.inf
        streams = self.batch.streams[rows.start:rows.stop]
        apply_penalties(logits, streams)
        if bitmask is not None:  # after the penalties: they reorder allowed tokens, never allow one
            _apply_bitmask(logits, bitmask.to(logits.device))
        ban_repeated_ngrams(logits, streams)
        tokens = sample_tokens(logits, [s.row for s in streams], self.batch.generators[rows.start:rows.stop])
        for stream, token in zip(streams, tokens, strict=True):
            try:
                self._advance(stream, token)
            except Exception as error:  # one row's failure (a bug, a backend error) is that row's alone
                logger.exception("a row failed in the decode loop; the batch goes on")
                self.finished["error"] += 1
                stream.emit("error", error)
        keep = [i for i, s in enumerate(self.batch.streams) if not s.done.is_set()]
        if len(keep) != len(self.batch):
            self.batch.keep(keep)

    def _advance(self, stream: Stream, token: int | None) -> None:
        out, row = stream.output, stream.row
        if stream.failure is not None:
            raise stream.failure
        if out.first_token_s is None:
            out.first_token_s = time.perf_counter() - stream.submitted_at
        if stream.cancelled.is_set():
            return self._finish(stream, "cancelled")
        text_after: str | None = None  # the output's text with `token`, when the closer decoded it
        if row.closer is not None and row.matcher is not None and token is not None \
                and (row.closer.closed_early or token not in self.eos_ids):
            remaining = row.max_new_tokens - len(out.token_ids)
            text_after = self.decode_text(out.token_ids + [token])
            chosen = row.closer.choose(token, text_after, remaining, row.matcher.accepts)
            if chosen is None:  # already complete: stop here rather than grow past the budget
                return self._close(stream)
            if chosen != token:
                token, text_after = chosen, None
        if token is None or (row.matcher is not None and token not in self.eos_ids and not row.matcher.advance(token)):
            return self._finish(stream, "length")  # the constraint allows nothing more: incomplete
        if token in self.eos_ids:
            out.accepted = row.matcher is not None
            return self._finish(stream, "stop")
        out.token_ids.append(token)
        out.text = text_after if text_after is not None else self.decode_text(out.token_ids)
        if row.closer is not None and row.closer.closed_early and not row.closer.forced:
            return self._close(stream)
        cut = _stop_hit(out.text, row.stop)
        if cut is not None:
            out.text = out.text[:cut]
            return self._finish(stream, "stop")
        if len(out.token_ids) >= row.max_new_tokens:
            return self._finish(stream, "length")
        stream.emit_text(final=False)
        return None

    def _close(self, stream: Stream) -> None:
        stream.output.accepted = stream.output.closed_early = True
        self.closed_early += 1
        return self._finish(stream, "stop")

    def _finish(self, stream: Stream, reason: str) -> None:
        self.finished[reason] += 1
        stream.output.finish_reason = reason
        stream.output.total_s = time.perf_counter() - stream.submitted_at
        stream.emit_text(final=True)
        stream.emit("done", stream.output)


def _fill_row(bitmask: torch.Tensor, i: int, matcher: RowMatcher, width: int) -> None:
    if matcher.width == width:
        matcher.fill(bitmask, i)
        return
    # The backend's vocabulary is narrower or wider than the model's logits.
    scratch = torch.zeros((1, matcher.width), dtype=torch.int32)
    matcher.fill(scratch, 0)
    bitmask[i] = 0
    n = min(width, matcher.width)
    bitmask[i, :n] = scratch[0, :n]


def _closed_error() -> Exception:
    from serve_app.errors import OverloadedError

    return OverloadedError("the engine is shutting down; retry on another replica", code="engine_closed")


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


def _apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set every token a row's bitmask disallows to -inf, for the whole batch at once."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().view(bitmask.shape[0], -1)
    width = min(allowed.shape[1], logits.shape[1])
    logits[:, :width].masked_fill_(~allowed[:, :width], -torch.inf)
    if logits.shape[1] > width:
        logits[:, width:] = -torch.inf
