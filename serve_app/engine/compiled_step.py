"""A compiled decode step (`compile_decode: true`, which configs/local.yaml sets): the one-token step of a
Llama-family model on CPU as one inductor graph, with `freezing` (weights as constants, oneDNN's
packed matmuls, the small ops between them fused into C++ kernels).

The step is the model's own modules called in Llama's order (norms, rotary embedding, the packed
projections of prepack.py, grouped-query attention over the batch's KV cache, MLP), not
transformers' forward: that builds masks and caches in Python from every step's sizes and
recompiled to dynamo's limit when compiled whole. Here the batch size and the cache width are
dynamic, the batch size unbacked (no graph of its own for one row), so one graph covers every
step. `warm_up` compiles it before the replica reports ready; `compiles` counts every compilation, so a
recompile in steady state shows in the replica's status. Prefills stay eager; with the step
compiled, the loop feeds jump-forward's forced tokens one per step, except where a few rows are
left and one jumped: one eager pass then feeds them (jump_forward.step_width). The graphs read
each layer's whole cache buffer (batch.GrowableLayer, contiguous, always a column of room beyond
the cache), write the new column in place and attend to the columns before it; the mask hides
padding and the dropped front columns. The code that calls the graphs' kernels is C++ (inductor's
`cpp_wrapper`), not some 1,200 lines of Python a step: bench-peers' schemas in-process, the
compiled steps took 9.7 s against 10.5 s, for about 20 s more warm-up.

Measured on SmolLM2-135M in bfloat16 on a 2-core CPU (docs/benchmarks.md): in-process, 64 free
requests at 16 rows, 310-330 -> 364-392 tokens/s (48-49 -> 40-43 ms a step); served, beside vLLM's
CPU build, person 1.07x, schemas 0.93x, free 1.17x (eager: 0.84x, 0.71x, 0.94x). Warm-up compiles
for about 90 s on those 2 cores (10-20 s for the tiny test model). bfloat16 greedy tokens can
differ from eager's where two logits nearly tie (8,050 against 8,077 tokens in that run).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)
# Model types whose decoder layers are Llama's (pre-norm, rotary, SiLU-gated MLP, no sliding window).
LLAMA_TYPES = ("llama",)
# Warm-up shapes: (rows, cache columns), distinct values so that dynamo does not assume them equal.
# One graph serves every batch size: a second, for one row (dynamo's own for a size of 1), cost
# another 60-75 s of warm-up on 2 cores for 2-3 ms a one-row step (docs/benchmarks.md).
WARM_UP_SHAPES = ((2, 7),)
# The warm-up's caches have room beyond the columns attended, as the batch's have (batch.GrowableLayer).
SPARE = 11


def unsupported_reason(model: Any) -> str | None:
    """Why the compiled step cannot run this model (None: it can)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in LLAMA_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {LLAMA_TYPES}"
    if getattr(model, "device", torch.device("cpu")).type != "cpu":
        return "the model is not on CPU"
    if len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1:
        return "the model is sharded"
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, name) for name in needed) or not hasattr(model, "lm_head"):
        return "the model does not have Llama's modules"
    return None


class CompiledStep:
    """`step(ids, positions, mask, keys, values)`: logits (rows, vocab) of one token per row. Each
    layer's cache is a whole buffer (rows, kv_heads, room, head_dim); the step writes its new key
    and value at column `columns - 1` and attends to the first `columns` (the mask's width)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.compiles = 0
        self.compile_seconds = 0.0
        self.calls = 0
        self._compiled = torch.compile(self._forward, backend=self._backend, fullgraph=True, dynamic=False)

    def _backend(self, graph: Any, inputs: Sequence[Any]) -> Any:
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        return compile_fx(graph, inputs)

    def step(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, keys: list[torch.Tensor],
             values: list[torch.Tensor]) -> torch.Tensor:
        """ids, positions (rows,); mask (rows, 1, 1, columns) bool; keys/values per layer, contiguous."""
        for tensor in (ids, positions, mask, *keys, *values):  # one symbol for the batch size, 1 included
            torch._dynamo.decorators.mark_unbacked(tensor, 0, shape_id="rows")
        torch._dynamo.mark_dynamic(mask, 3)
        for tensor in (*keys, *values):
            torch._dynamo.mark_dynamic(tensor, 2)
        import torch._inductor.config as inductor

        self.calls += 1
        with inductor.patch(freezing=True, compile_threads=1, cpp_wrapper=True):
            started, before = time.perf_counter(), self.compiles
            logits = self._compiled(ids, positions, mask, keys, values)
            if self.compiles != before:
                self.compile_seconds += time.perf_counter() - started
        return logits

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile the graph on dummy inputs."""
        config, dtype = self.model.config, self.model.dtype
        kv_heads = config.num_key_value_heads
        head_dim = self.model.model.layers[0].self_attn.head_dim
        for rows, columns in WARM_UP_SHAPES:
            def cache() -> list[torch.Tensor]:
                return [torch.zeros(rows, kv_heads, columns + SPARE, head_dim, dtype=dtype)  # noqa: B023
                        for _ in self.model.model.layers]

            self.step(torch.zeros(rows, dtype=torch.long), torch.arange(rows) + columns - 1,
                      torch.ones(rows, 1, 1, columns, dtype=torch.bool), cache(), cache())
        logger.info("compiled the decode step: %d graphs in %.1f s", self.compiles, self.compile_seconds)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, keys: list[torch.Tensor],
                 values: list[torch.Tensor]) -> torch.Tensor:
        inner = self.model.model
        x = inner.embed_tokens(ids)[:, None, :]
        cos, sin = inner.rotary_emb(x, positions[:, None])
        for layer, layer_keys, layer_values in zip(inner.layers, keys, values, strict=True):
            x = x + _attention(layer.self_attn, layer.input_layernorm(x), cos, sin, mask, layer_keys, layer_values)
            x = x + _mlp(layer.mlp, layer.post_attention_layernorm(x))
        return self.model.lm_head(inner.norm(x))[:, 0, :]


def _attention(attention: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Llama's attention for one token per row; the query heads sharing a key/value head are
    attended together (attention.py's packed layout)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rows, dim, columns = x.shape[0], attention.head_dim, mask.shape[3]
    q, k, v = _projections(x, (attention.q_proj, attention.k_proj, attention.v_proj))
    q = q.view(rows, 1, -1, dim).transpose(1, 2)
    k = k.view(rows, 1, -1, dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys[:, :, columns - 1:columns].copy_(k)
    values[:, :, columns - 1:columns].copy_(v.view(rows, 1, -1, dim).transpose(1, 2))
    out = torch.nn.functional.scaled_dot_product_attention(q.reshape(rows, keys.shape[1], -1, dim),
                                                           keys[:, :, :columns], values[:, :, :columns],
                                                           attn_mask=mask, scale=attention.scaling)
    return attention.o_proj(out.reshape(rows, 1, -1))


def _mlp(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = _projections(x, (mlp.gate_proj, mlp.up_proj))
    return mlp.down_proj(mlp.act_fn(gate) * up)


def _projections(x: torch.Tensor, linears: tuple[Any, ...]) -> list[torch.Tensor]:
    """Each layer's output on `x`: one packed matmul where prepack.py shared the input."""
    from serve_app.engine.prepack import SharedInputSlice

    first = linears[0]
    if isinstance(first, SharedInputSlice) and all(getattr(m, "shared", None) is first.shared for m in linears):
        return list(first.shared.packed(x).split([m.out_features for m in linears], dim=-1))
    return [linear(x) for linear in linears]
