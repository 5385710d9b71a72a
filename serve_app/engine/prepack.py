"""Linear layers with their weights prepacked for oneDNN, on CPU: the trick behind vLLM's CPU
path and inductor's `freezing`, without compiling anything.

PyTorch's eager `F.linear` reorders the weight into oneDNN's blocked layout at every call; a
prepacked weight is reordered once, at load. Measured on SmolLM2-135M in bfloat16 on a 2-core
AVX-512 CPU: one matmul of a 16-row decode step 1.3-2.3x faster, an in-process mixed workload's
generation about 1.3x (docs/benchmarks.md). The packed weight replaces the layer's own; a weight tied to another module
(an LM head sharing the embeddings) stays where it is. Packed copies are anonymous memory, so a
checkpoint that was memory-mapped (safetensors) no longer is for these layers: its pages become
cache the kernel can drop, and the process's anonymous memory grows by the weights' size.

Each layer is checked against `F.linear` once before it is swapped; where the op is missing or
disagrees (an old PyTorch, float16 without AVX-512-FP16), the model keeps transformers' layers.

Sibling layers that read the same input (an attention's `q_proj`/`k_proj`/`v_proj`, an MLP's
`gate_proj`/`up_proj`) are packed as one matmul whose output each of them slices, as vLLM's
`QKVParallelLinear` does: per SmolLM2 layer at 16 rows 154 -> 86 us for q, k, v and 292 -> 252 us
for gate, up (one decode step ~6% faster; at one row 104 -> 44 and 193 -> 151 us).
"""

from __future__ import annotations

import logging
from typing import Any, TypeGuard

import torch

logger = logging.getLogger(__name__)
# The dtypes oneDNN's packed linear runs on a plain x86 CPU; float16 needs CPU features that the
# probe finds missing on most machines.
PACKED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Relative error allowed between the packed and the eager result of the probe (bfloat16 rounding).
PROBE_TOLERANCE = 2e-2


class PrepackedLinear(torch.nn.Module):
    """`torch.nn.Linear`'s forward over a weight in oneDNN's layout."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 16),
                                 persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# Children of one module that transformers' decoder layers call on the same input, in call order.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInputLinears(torch.nn.Module):
    """Sibling linear layers as one packed matmul: the first of them to see an input computes every
    sibling's output; the others slice it (the same tensor object), and it is let go once each has."""

    def __init__(self, linears: list[torch.nn.Linear]) -> None:
        super().__init__()
        first = linears[0]
        fused = torch.nn.Linear(first.in_features, sum(m.out_features for m in linears),
                                bias=any(m.bias is not None for m in linears), device="meta")
        with torch.no_grad():
            fused.weight = torch.nn.Parameter(torch.cat([m.weight for m in linears]), requires_grad=False)
            if fused.bias is not None:
                fused.bias = torch.nn.Parameter(torch.cat([
                    m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears]),
                    requires_grad=False)
        self.packed = PrepackedLinear(fused)
        self.members = len(linears)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._taken = 0

    def output_for(self, x: torch.Tensor) -> torch.Tensor:
        last = self._last
        if last is None or last[0] is not x:  # a new input (or a sibling called on another one)
            last, self._taken = (x, self.packed(x)), 0
        self._taken += 1
        self._last = last if self._taken < self.members else None
        return last[1]


class SharedInputSlice(torch.nn.Module):
    """One sibling of a SharedInputLinears: its columns of the shared output."""

    def __init__(self, shared: SharedInputLinears, start: int, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.shared, self.start = shared, start
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output_for(x)[..., self.start:self.start + self.out_features]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, columns from {self.start}"


def prepack_linears(model: Any) -> int:
    """Swap the CPU model's `nn.Linear` layers for prepacked ones; how many were swapped (0: the
    model is unchanged, because it is not on CPU, its dtype has no packed path, or the probe failed)."""
    if getattr(model, "device", torch.device("cpu")).type != "cpu" or model.dtype not in PACKED_DTYPES:
        return 0
    if not torch.backends.mkldnn.is_available():
        return 0
    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is torch.nn.Linear]
    if not linears or not _probe(linears[0][2]):
        return 0
    shared = share_inputs(model)
    for parent, name, child in linears:
        if getattr(parent, name) is child:  # not one of the siblings just shared
            setattr(parent, name, PrepackedLinear(child))
    logger.info("prepacked %d linear layers for oneDNN (%d of them sharing an input)", len(linears), shared)
    return len(linears)


def share_inputs(model: Any) -> int:
    """Pack each group of SIBLINGS (plain, alike linear layers) as one; how many layers were."""
    shared = 0
    for parent in list(model.modules()):
        for names in SIBLINGS:
            linears = [getattr(parent, name, None) for name in names]
            if not _alike(linears):
                continue
            group, start = SharedInputLinears(linears), 0
            for name, linear in zip(names, linears, strict=True):
                setattr(parent, name, SharedInputSlice(group, start, linear))
                start += linear.out_features
            shared += len(names)
    return shared


def _alike(linears: list[Any]) -> TypeGuard[list[torch.nn.Linear]]:
    first = linears[0]
    return all(type(m) is torch.nn.Linear and m.in_features == first.in_features
               and m.weight.dtype == first.weight.dtype and m.weight.device == first.weight.device for m in linears)


def _probe(linear: torch.nn.Linear) -> bool:
    """Whether the packed op runs here and agrees with `F.linear` on this layer."""
    try:
        with torch.inference_mode():
            x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0)).to(linear.weight.dtype)
            expected = torch.nn.functional.linear(x, linear.weight, linear.bias).float()
            got = PrepackedLinear(linear)(x).float()
    except (RuntimeError, AttributeError) as error:
        logger.info("linear layers stay unpacked: oneDNN's packed linear is unavailable here (%s)", error)
        return False
    relative = float((got - expected).norm() / expected.norm().clamp(min=1e-6))
    if relative > PROBE_TOLERANCE:
        logger.warning("linear layers stay unpacked: oneDNN's packed result is off by %.3g", relative)
        return False
    return True
