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


class Attention(torch.nn.Module):
    def __init__(self, bias: tuple[bool, bool, bool]) -> None:
        super().__init__()
        widths = zip((16, 8, 8), bias, strict=True)
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(16, n, bias=b) for n, b in widths)


@pytest.mark.parametrize("bias", [(False, False, False), (True, True, True), (True, False, True)])
def test_siblings_reading_one_input_are_one_matmul_with_each_ones_numbers(bias):
    torch.manual_seed(0)
    stock = Attention(bias)
    shared = Attention(bias)
    shared.load_state_dict(stock.state_dict())
    assert prepack.share_inputs(shared) == 3
    group = shared.q_proj.shared
    assert shared.k_proj.shared is group and shared.v_proj.shared is group
    x, other = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    with torch.inference_mode():
        for name in ("q_proj", "k_proj", "v_proj"):  # the call order of a decoder layer
            torch.testing.assert_close(getattr(shared, name)(x), getattr(stock, name)(x), rtol=1e-4, atol=1e-4)
        assert group._last is None  # let go once every sibling has its part
        torch.testing.assert_close(shared.q_proj(x), stock.q_proj(x), rtol=1e-4, atol=1e-4)
        # A sibling called on another input gets that input's numbers, not the held output's.
        torch.testing.assert_close(shared.k_proj(other), stock.k_proj(other), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(shared.v_proj(x), stock.v_proj(x), rtol=1e-4, atol=1e-4)


def test_unlike_siblings_stay_apart():
    model = Attention((False, False, False))
    model.v_proj = torch.nn.Linear(12, 8)  # another input width
    assert prepack.share_inputs(model) == 0
    assert all(type(m) is torch.nn.Linear for m in (model.q_proj, model.k_proj, model.v_proj))


def test_the_loaded_models_attention_and_mlp_share_their_inputs(tiny_model_dir):
    with create_engine(ModelConfig(name="tiny", source=tiny_model_dir)) as engine:
        layer = engine.model.model.layers[0]
        assert isinstance(layer.self_attn.q_proj, prepack.SharedInputSlice)
        assert isinstance(layer.mlp.up_proj, prepack.SharedInputSlice)
        assert type(layer.self_attn.o_proj) is PrepackedLinear
