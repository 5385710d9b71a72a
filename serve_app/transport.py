"""How the router's call reaches a model replica. A Serve handle sends it one of two ways:
through Ray's object store (by reference: any size), or straight to the replica's own gRPC server
(by value). By value the router spent 0.12 s of CPU on 16 requests where it spent 0.16-0.18 s
(docs/benchmarks.md), CPU that a small machine's decode loop gets back; but each way is one gRPC
message, and the replica and the router refuse one over Ray's limit (4 MiB by default).

So a call goes by gRPC when its payload and the largest result its rows could return both surely
fit, and by reference otherwise; a call gRPC still refuses for its size is sent again by reference
(`too_large`), never failed."""

import json
from typing import Any

from ray.serve._private.constants import RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH

from serve_app.config import ModelConfig
from serve_app.generation import GenerationRequest

# Half the limit each way leaves room for pickling's overhead and for the fields beside the text.
BUDGET_BYTES = RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH // 2
# Generous per generated token: its text (a vocabulary entry, rarely past 64 bytes), its id and,
# with logprobs, each alternative's token, bytes and log-probability.
BYTES_PER_TOKEN = 256


def result_bound(model: ModelConfig, rows: list[GenerationRequest]) -> int:
    """Bytes the rows' results could take at most, to within the per-token allowance."""
    total = 0
    for row in rows:
        tokens = row.sampling.max_new_tokens or model.limits.max_new_tokens
        alternatives = 0 if row.sampling.logprobs is None else row.sampling.logprobs + 1
        total += tokens * BYTES_PER_TOKEN * (1 + alternatives)
    return total


def fits_grpc(model: ModelConfig, rows: list[GenerationRequest], payload: list[dict[str, Any]]) -> bool:
    if result_bound(model, rows) > BUDGET_BYTES:
        return False
    return len(json.dumps(payload, separators=(",", ":"))) <= BUDGET_BYTES


def too_large(error: BaseException) -> bool:
    """gRPC refused a message for its size (the request at the replica, or the result at the router)."""
    import grpc

    return isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


class Handles:
    """Each model's handle both ways; `for_call` picks one."""

    def __init__(self, handles: dict[str, Any]) -> None:
        self.by_reference = handles
        self.by_value = {name: handle.options(_by_reference=False) for name, handle in handles.items()}

    def for_call(self, model: ModelConfig, rows: list[GenerationRequest], payload: list[dict[str, Any]]) -> Any:
        table = self.by_value if fits_grpc(model, rows, payload) else self.by_reference
        return table[model.name]
