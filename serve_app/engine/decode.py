"""Continuous batching, scheduling only: one decode loop per engine admits rows between steps
(each with its own prompt length, constraint matcher and sampling parameters), prefills them,
steps the batch, retires finished rows and recovers from out-of-memory. What happens to a row's
tokens is decided by its policies (policies.py) and sampling (sampling.py).

Layout: the batch's KV cache is left-padded to a common width (batch.py); an attention mask
hides the padding, and each row keeps its own position ids. A newly admitted group is prefilled
on its own, then its cache is padded and concatenated to the batch's; a row whose prompt the
prefix cache holds all but a few tokens of joins with that cache, and the steps feed it the rest
(`_fold`). Masks for every constrained row are written into one int32 bitmask and applied to the
batch's logits in one tensor op; they are computed in a worker thread while the model runs the
next forward pass.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from serve_app.engine.batch import (
    Batch,
    GrowableLayer,
    accepts_keyword,
    cache_keyword,
    joinable_cache,
    preallocate,
    prefill_groups,
)
from serve_app.engine.checked_steps import TAKEN_BACK, advance_checked, count_checks, roll_back_row
from serve_app.engine.jump_forward import MAX_FORCED_PER_TOKEN, block, forced_tokens, step_width, uncached
from serve_app.engine.policies import CLOSED, TokenStep, advance_row, constraint_bitmask, row_policies
from serve_app.engine.prefix_cache import PrefixCache
from serve_app.engine.sampling import next_tokens, token_logprobs
from serve_app.engine.stream import Row, RowOutput, Stream

if TYPE_CHECKING:
    from serve_app.engine.compiled_step import CompiledStep

logger = logging.getLogger(__name__)
# An idle loop rechecks for work this often; a submit wakes it at once.
IDLE_WAKE_S = 1.0

__all__ = ["DecodeLoop", "Row", "RowOutput", "Stream"]


class DecodeLoop:
    """Runs in one background thread per engine; `submit` is thread-safe."""

    def __init__(self, model: Any, decode_text: Callable[[list[int]], str], pad_id: int, eos_ids: set[int],
                 vocab_size: int, max_batch_size: Callable[[], int], prefix_cache_bytes: int = 0,
                 jump_forward: int = 0, compiled: CompiledStep | None = None) -> None:
        self.model = model
        self.decode_text = decode_text
        self.pad_id = pad_id
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size
        self.max_batch_size = max_batch_size
        self.cache_kw = cache_keyword(model)
        self.prefixes = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        # Grammar-forced tokens: appended without sampling, at most this many fed per row and
        # forward pass (jump_forward.py); 0 = off. With the step compiled, one per pass unless few
        # rows are left (step_width): a full batch's compiled one-token steps beat eager wider
        # passes (bench-peers' schemas in-process: 121-126 tok/s all fed up to 8 wide, 141-144 one
        # per pass), a row alone does not (12 schemas one at a time: 49-54 tok/s, 43-46 one per pass).
        self.jump_forward = jump_forward
        # The one-token step compiled (compiled_step.py; compile_decode), None: eager.
        self.compiled = compiled
        # A prefill needs the logits of the last position only; the rest would cost a full
        # vocabulary projection per prompt token.
        self.last_logits_only = {"logits_to_keep": 1} if accepts_keyword(model, "logits_to_keep") else {}
        self.device = model.device
        self.waiting: queue.SimpleQueue[Stream] = queue.SimpleQueue()
        self.preempted: deque[Stream] = deque()  # rows split off on out-of-memory, resumed first
        self.cap_after_oom: int | None = None
        self.oom_events: Counter[str] = Counter()  # split, cpu_fallback, failed
        # on_oom() moves the model off the GPU (engine's CPU fallback); True if it did.
        self.on_oom: Callable[[], bool] | None = None
        # Test-only injection point: called with the batch size before every forward pass.
        self.fault_injector: Callable[[int], None] | None = None
        self.batch = Batch()
        self.policies = row_policies(eos_ids, decode_text)
        self.joinable = True
        self._wake = threading.Event()
        self._masker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="masks")
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._start_counting()

    def _start_counting(self) -> None:
        """What the loop counts for the replica's status and health."""
        self.steps = 0
        self.rows_stepped = 0  # sum of the batch size over decode steps (mean batch = this / steps)
        self.prefills = 0  # forward passes that prefilled newly admitted rows
        self.folded = 0  # rows admitted from the prefix cache without a prefill pass (_fold)
        self.finished: Counter[str] = Counter()  # rows by finish reason
        self.closed_early = 0  # rows the closer finished before their budget ran out
        self.forced_tokens = 0  # tokens appended because the grammar forced them, not sampled
        self.checks: Counter[str] = Counter()  # checked keywords: values evaluated, violations, rollbacks, exhausted
        self.progress_at = time.monotonic()  # the last time the loop went round (health: stalled_for)
        self.admitting = 0  # rows taken from the queue and being prefilled, not yet in the batch

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
        """(waiting, running) rows; a row that finished this step is not running (it leaves the batch
        after the step, its caller may already hold its result)."""
        running = sum(1 for stream in list(self.batch.streams) if not stream.done.is_set())
        return self.waiting.qsize() + len(self.preempted), running + self.admitting

    def stalled_for(self) -> float:
        """Seconds the loop has had rows to run without going round once (0 with nothing to do):
        a forward pass or a mask that never returns, or a thread that died with work queued."""
        waiting, running = self.queue_depth()
        if not waiting and not running:
            return 0.0
        with self._lock:
            thread = self._thread
        if thread is None or not thread.is_alive():
            return float("inf") if not self._closed.is_set() else 0.0
        return time.monotonic() - self.progress_at

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
            self.progress_at = time.monotonic()
            self._admit()
            if not len(self.batch):
                if not self.preempted:
                    self.cap_after_oom = None  # memory pressure is gone with the batch
                self._wake.wait(timeout=IDLE_WAKE_S)
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
            if self.prefixes is not None:
                self.prefixes.clear()  # its tensors live on the old device
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
        try:
            group = self._fold(group)
        except Exception as error:
            self._recover(group, error)
            return
        for part in prefill_groups(group):
            self.admitting = len(part)
            try:
                self._prefill(part)
            except Exception as error:
                self._recover(part, error)
            finally:
                self.admitting = 0

    @torch.inference_mode()
    def _fold(self, group: list[Stream]) -> list[Stream]:
        """Rows whose context the prefix cache holds all but FOLD_TAIL tokens of (1 into an empty
        batch) join the batch without a prefill pass: their cached prefix is merged, and the decode
        steps feed the rest (a served replica's clients arrive one at a time, and a one-row prefill
        holds every running row up for a pass). Returns the rows still to prefill."""
        if self.prefixes is None or not self.joinable or not len(self.prefixes.entries):
            return group
        # With no row running, the steps would be the new rows' alone: one prefill pass is cheaper.
        limit = FOLD_TAIL if len(self.batch) else 1
        near = []
        for stream in group:
            context = stream.context_ids()
            hit = self.prefixes.longest(context)
            if hit is not None and len(context) - hit[1] <= limit:
                near.append(stream)
        if not near:
            return group
        extra: dict[str, Any] = {}
        cached, mask = self._reuse_prefixes([s.context_ids() for s in near], extra)
        if mask is None:
            return group
        _started(near)
        cache = extra[self.cache_kw]
        if self.batch.cache is None:
            preallocate(cache)  # it becomes the batch's
        self.batch.merge(near, cache, mask.to(self.device), cached)
        self.folded += len(near)
        return [s for s in group if not any(s is n for n in near)]

    @torch.inference_mode()
    def _prefill(self, group: list[Stream]) -> None:
        _started(group)
        contexts = [s.context_ids() for s in group]
        extra: dict[str, Any] = dict(self.last_logits_only)
        reused, prefix_mask = self._reuse_prefixes(contexts, extra)
        tails = [c[r:] for c, r in zip(contexts, reused, strict=True)]
        width = max(len(t) for t in tails)
        ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, tail in enumerate(tails):
            ids[i, width - len(tail):] = torch.tensor(tail, dtype=torch.long)
            mask[i, width - len(tail):] = 1
        positions = torch.tensor(reused, dtype=torch.long)[:, None] + (mask.cumsum(-1) - 1).clamp(min=0)
        if prefix_mask is not None:  # each row's cached prefix, left-padded to the longest
            mask = torch.cat([prefix_mask, mask], dim=1)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        self.prefills += 1
        cache = out[self.cache_kw]
        self.joinable = joinable_cache(cache)
        preallocate(cache)
        if self.prefixes is not None and self.joinable:
            self._remember_prompts(group, contexts, cache, mask, reused)
        first = len(self.batch)
        self.batch.merge(group, cache, mask)
        logits = out.logits[:, -1, :].float()
        bitmask = constraint_bitmask(group, self.vocab_size)
        self._sample_and_advance(logits, bitmask, list(range(first, first + len(group))))

    def _reuse_prefixes(self, contexts: list[list[int]], extra: dict[str, Any]) -> tuple[list[int], Any]:
        """Each row's longest cached prefix: how many tokens each reuses, and the mask of the
        prefix columns (None where nothing is reused); their cache goes into `extra`."""
        none: tuple[list[int], Any] = ([0] * len(contexts), None)
        if self.prefixes is None or not self.joinable:
            return none
        hits = self.prefixes.find_each(contexts)
        if all(hit is None for hit in hits):
            return none
        cache = self._prefix_cache(hits)
        if cache is None:
            return none
        extra[self.cache_kw] = cache
        reused = [hit[1] if hit is not None else 0 for hit in hits]
        width = max(reused)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for i, length in enumerate(reused):
            if length:
                mask[i, width - length:] = 1
        return reused, mask

    def _prefix_cache(self, hits: list[tuple[tuple[int, ...], int] | None]) -> Any:
        """A cache holding each row's prefix (left-padded); None (and the prefix cache off) where
        this transformers cannot build one from tensors."""
        assert self.prefixes is not None
        try:
            from transformers import DynamicCache

            return DynamicCache(self.prefixes.rows(hits), config=self.model.config)
        except Exception:  # noqa: BLE001 - an older cache API: prefill in full from now on
            logger.warning("the prefix cache is off: this transformers cannot build a cache from tensors",
                           exc_info=True)
            self.prefixes = None
            return None

    def _remember_prompts(self, group: list[Stream], contexts: list[list[int]], cache: Any, mask: torch.Tensor,
                          reused: list[int]) -> None:
        """Keep the KV cache of prompts seen for the first time (not of resumed rows), where the
        prefix cache finds them worth it (PrefixCache.worth_keeping)."""
        assert self.prefixes is not None
        for i, (stream, context) in enumerate(zip(group, contexts, strict=True)):
            if stream.output.token_ids or not self.prefixes.worth_keeping(context, reused[i]):
                continue
            columns = mask[i].nonzero(as_tuple=True)[0]
            self.prefixes.add(context, [(layer.keys[i:i + 1].index_select(2, columns),
                                         layer.values[i:i + 1].index_select(2, columns)) for layer in cache.layers])

    @torch.inference_mode()
    def _step(self) -> None:
        batch = self.batch
        assert batch.mask is not None
        # Each row's context not yet in the KV cache: its last token; more after a jump-forward; a
        # prompt token again where a check took all the output back.
        tails = [uncached(s, p) for s, p in zip(batch.streams, batch.positions, strict=True)]
        width = step_width([len(t) for t in tails], self.jump_forward, self.compiled is not None)
        ids, columns, positions, fed = block(tails, width, batch.positions, self.pad_id)
        sampling = [i for i, tail in enumerate(tails) if len(tail) <= width]  # the others have tokens left to feed
        # The masks for this step depend only on the tokens already appended: compute them while
        # the model runs.
        pending = self._masker.submit(constraint_bitmask, [batch.streams[i] for i in sampling], self.vocab_size)
        batch.mask = torch.cat([batch.mask, columns.to(batch.mask.device)], dim=1)
        logits = self._compiled_step(ids, positions) if width == 1 else None
        if logits is None:
            out = self._forward(input_ids=ids.to(self.device), attention_mask=batch.mask,
                                position_ids=positions.to(self.device), use_cache=True, **self.last_logits_only,
                                **{self.cache_kw: batch.cache})
            batch.cache, logits = out[self.cache_kw], out.logits[:, -1, :]
        batch.positions = [p + n for p, n in zip(batch.positions, fed, strict=True)]
        self.steps += 1
        self.rows_stepped += len(batch)
        bitmask = pending.result()
        if sampling:
            self._sample_and_advance(logits[sampling].float(), bitmask, sampling)

    def _compiled_step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """The step's logits from the compiled step, where there is one and the cache is ours;
        None: run the model eagerly. A compiled step that fails is dropped, logged, for good."""
        layers = getattr(self.batch.cache, "layers", None)
        if self.compiled is None or not layers or not all(isinstance(layer, GrowableLayer) for layer in layers):
            return None
        if self.fault_injector is not None:
            self.fault_injector(int(ids.shape[0]))
        appended: list[GrowableLayer] = []
        try:
            for layer in layers:  # a column each, which the compiled step fills
                layer.update(*(torch.zeros_like(t[:, :, :1]) for t in (layer.keys, layer.values)))
                appended.append(layer)
            buffers = [layer.buffers() for layer in layers]
            first, end = buffers[0][2:] if buffers[0] else (-1, -1)
            assert self.batch.mask is not None and all(b and b[2:] == (first, end) for b in buffers)
            # The columns dropped from the front of the buffers are hidden, as the padding is.
            mask = F.pad(self.batch.mask != 0, (first, 0))[:, None, None, :]
            return self.compiled.step(ids[:, 0], positions[:, 0], mask, [b[0] for b in buffers],
                                      [b[1] for b in buffers])
        except Exception:  # noqa: BLE001 - eager from now on
            logger.warning("the compiled decode step failed; decoding eagerly from now on", exc_info=True)
            for layer in appended:
                layer.drop_last(1)
            self.compiled = None
            return None

    def _forward(self, **inputs: Any) -> Any:
        if self.fault_injector is not None:
            self.fault_injector(int(inputs["input_ids"].shape[0]))
        return self.model(**inputs)

    def _sample_and_advance(self, logits: torch.Tensor, bitmask: torch.Tensor | None, rows: list[int]) -> None:
        """Sample the next token of the batch's `rows` (logits[j] and bitmask[j] are rows[j]'s)."""
        streams = [self.batch.streams[i] for i in rows]
        tokens = next_tokens(logits, streams, bitmask, [self.batch.generators[i] for i in rows], self.vocab_size)
        logprobs = token_logprobs(logits, streams)
        for j, (stream, token, row_logprobs) in enumerate(zip(streams, tokens, logprobs, strict=True)):
            self._advance(stream, token, row_logprobs, logits[j], rows[j])
        keep = [i for i, s in enumerate(self.batch.streams) if not s.done.is_set()]
        if len(keep) != len(self.batch):
            self.batch.keep(keep)

    def _advance(self, stream: Stream, token: int | None, logprobs: torch.Tensor | None = None,
                 logits: torch.Tensor | None = None, index: int = -1) -> None:
        try:
            verdict = advance_checked(TokenStep(stream, token, logprobs=logprobs), self.policies, self.decode_text,
                                      logits, self.batch.generators[index] if index >= 0 else None,
                                      lambda s, n: self._take_back(s, index, n))
            if verdict is None and self.jump_forward:
                verdict = self._jump(stream)
        except Exception as error:  # one row's failure (a bug, a backend error) is that row's alone
            logger.exception("a row failed in the decode loop; the batch goes on")
            self.finished["error"] += 1
            stream.emit("error", error)
            return
        if verdict is TAKEN_BACK:
            return  # the row feeds its previous token again at the next step
        if verdict == CLOSED:
            stream.output.accepted = stream.output.closed_early = True
            self.closed_early += 1
            verdict = "stop"
        if verdict is not None:
            self._finish(stream, verdict)

    def _jump(self, stream: Stream) -> str | None:
        """Append the tokens the row's grammar forces after its sampled token, each through the
        row's policies; the chain stops where a policy ends the row or writes another token."""
        for token in forced_tokens(stream, MAX_FORCED_PER_TOKEN):
            before = len(stream.output.token_ids)
            step = TokenStep(stream, token)
            try:
                verdict = advance_row(step, self.policies, self.decode_text)
            finally:
                self.forced_tokens += len(stream.output.token_ids) - before
            if verdict is not None or step.token != token:
                return verdict
        return None

    def _take_back(self, stream: Stream, index: int, tokens: int) -> bool:
        """Undo the row's last `tokens` tokens (checked_steps.roll_back_row); in the KV cache their
        columns and the one before are masked out, and the token before them is fed again (at its
        old position) so that the next step samples the first of them anew."""
        if not roll_back_row(stream, tokens, self.decode_text):
            logger.warning("the matcher cannot roll back %d tokens", tokens)
            return False
        mask = self.batch.mask
        assert mask is not None
        real = mask[index].nonzero(as_tuple=True)[0]
        mask[index, real[-(tokens + 1):]] = 0
        self.batch.positions[index] -= tokens + 1
        return True

    def _finish(self, stream: Stream, reason: str) -> None:
        count_checks(self.checks, stream)
        self.finished[reason] += 1
        stream.output.finish_reason = reason
        stream.output.total_s = time.perf_counter() - stream.submitted_at
        stream.emit_text(final=True)
        stream.emit("done", stream.output)


# A row whose context the prefix cache holds all but this many tokens of joins a running batch and
# is fed them by the decode steps rather than prefilled (`_fold`): each costs a row's share of a
# step, not a pass that holds every running row up, but keeps the row's slot a step longer. Served
# (bench-peers, 16 clients), 12 wrote no more tokens/s than none: a tail of 10 holds a slot 9 steps.
FOLD_TAIL = 4


def _started(streams: list[Stream]) -> None:
    now = time.perf_counter()
    for stream in streams:
        if stream.output.queue_s is None:
            stream.output.queue_s = now - stream.submitted_at


def _closed_error() -> Exception:
    from serve_app.errors import OverloadedError

    return OverloadedError("the engine is shutting down; retry on another replica", code="engine_closed")
