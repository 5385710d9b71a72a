"""Which way the router's call goes: by gRPC when the payload and the largest possible result
surely fit one message, by reference otherwise (the handles are stand-ins: only `options` is read)."""

from __future__ import annotations

import pytest

from serve_app.config import ModelConfig
from serve_app.generation import GenerationRequest
from serve_app.transport import BUDGET_BYTES, Handles, fits_grpc, result_bound, too_large


class _Handle:
    def __init__(self, by_reference: bool = True) -> None:
        self.by_reference = by_reference

    def options(self, _by_reference: bool) -> _Handle:
        return _Handle(_by_reference)


MODEL = ModelConfig(name="m", source="builtin:tiny-random-llama", limits={"max_new_tokens": 512})


def _rows(count: int, **sampling) -> list[GenerationRequest]:
    return [GenerationRequest(prompt="hi", sampling=sampling) for _ in range(count)]


def _payload(rows: list[GenerationRequest]) -> list[dict]:
    return [row.model_dump(mode="json", by_alias=True) for row in rows]


def test_a_small_call_goes_by_grpc_and_a_large_result_by_reference():
    handles = Handles({"m": _Handle()})
    small = _rows(1, max_new_tokens=32)
    assert handles.for_call(MODEL, small, _payload(small)).by_reference is False
    # Left out, max_new_tokens counts as the model's limit; logprobs multiply the allowance per token.
    assert result_bound(MODEL, _rows(1)) == 512 * 256
    many = _rows(BUDGET_BYTES // (512 * 256) + 1)
    assert handles.for_call(MODEL, many, _payload(many)).by_reference is True
    with_logprobs = _rows(1, max_new_tokens=512, logprobs=20)
    assert result_bound(MODEL, with_logprobs) == 512 * 256 * 22
    assert handles.for_call(MODEL, with_logprobs, _payload(with_logprobs)).by_reference is True


def test_a_large_payload_goes_by_reference():
    rows = [GenerationRequest(prompt="x" * (BUDGET_BYTES + 1), sampling={"max_new_tokens": 1})]
    assert not fits_grpc(MODEL, rows, _payload(rows))


@pytest.mark.parametrize(("code", "expected"), [("RESOURCE_EXHAUSTED", True), ("UNAVAILABLE", False)])
def test_only_a_refusal_for_size_counts_as_too_large(code, expected):
    import grpc

    error = grpc.aio.AioRpcError(getattr(grpc.StatusCode, code), grpc.aio.Metadata(), grpc.aio.Metadata())
    assert too_large(error) is expected
    assert not too_large(ValueError("RESOURCE_EXHAUSTED"))
