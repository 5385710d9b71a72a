"""Linear weights prepacked for oneDNN (engine/prepack.py): the same numbers as `nn.Linear`, the
same greedy tokens through the real loading path, and transformers' layers where it is off."""

import pytest
import torch

from serve_app.config import ModelConfig
from serve_app.engine import prepack
from serve_app.engine.factory import create_engine
from serve_app.engine.prepack import PrepackedLinear, prepack_linears
from serve_app.generation import GenerationRequest, SamplingParams


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_layer_computes_what_the_linear_layer_computes(dtype, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80, bias=bias).to(dtype)
    x = torch.randn(2, 5, 48).to(dtype)  # (batch, positions, features), as a decoder layer sends it
    with torch.inference_mode():
        expected, got = linear(x), PrepackedLinear(linear)(x)
    assert got.shape == (2, 5, 80) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def packed_layers(model) -> int:
    return sum(isinstance(m, PrepackedLinear) for m in model.modules())


def greedy(config: ModelConfig) -> tuple[list[list[int]], int, int]:
    prompts = ["hello", "a much longer prompt about json"]  # left-padded rows in one batch
    requests = [GenerationRequest(prompt=p, sampling=SamplingParams(max_new_tokens=16)) for p in prompts]
    with create_engine(config) as engine:
        plain = sum(type(m) is torch.nn.Linear for m in engine.model.modules())
        return [r.token_ids for r in engine.generate(requests)], packed_layers(engine.model), plain


def test_the_loaded_model_is_packed_and_decodes_the_same_tokens(tiny_model_dir):
    packed, count, plain = greedy(ModelConfig(name="tiny", source=tiny_model_dir, sampling={"temperature": 0}))
    assert count > 0 and plain == 0  # every linear layer, the LM head included
    stock, count, plain = greedy(ModelConfig(name="tiny", source=tiny_model_dir, sampling={"temperature": 0},
                                             loading={"prepack_weights": False}))
    assert count == 0 and plain > 0
    assert packed == stock


def test_where_the_packed_op_disagrees_the_model_keeps_its_layers(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    model.device, model.dtype = torch.device("cpu"), torch.float32  # what a transformers model has
    monkeypatch.setattr(prepack.PrepackedLinear, "forward", lambda self, x: torch.zeros(x.shape[0], self.out_features))
    assert prepack_linears(model) == 0
    assert all(type(m) is torch.nn.Linear for m in model)
    monkeypatch.undo()
    assert prepack_linears(model) == 2
    assert all(isinstance(m, PrepackedLinear) for m in model)
