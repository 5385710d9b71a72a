"""GPU memory readings for health and metrics (torch.cuda; a stated reason on CPU)."""

from __future__ import annotations

from typing import Any


def gpu_memory(device_indices: list[int] | None = None) -> dict[str, Any]:
    """Allocated / reserved / total bytes per visible CUDA device, or why there are none."""
    import torch

    if not torch.cuda.is_available():
        return {"devices": [], "reason": "no CUDA device in this process"}
    indices = device_indices if device_indices is not None else list(range(torch.cuda.device_count()))
    return {"devices": [_reading(i) for i in indices], "reason": None}


def _reading(index: int) -> dict[str, Any]:
    import torch

    return {
        "device": index,
        "allocated_bytes": int(torch.cuda.memory_allocated(index)),
        "reserved_bytes": int(torch.cuda.memory_reserved(index)),
        "max_allocated_bytes": int(torch.cuda.max_memory_allocated(index)),
        "total_bytes": int(torch.cuda.get_device_properties(index).total_memory),
    }
