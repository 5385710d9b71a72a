"""The packed decode attention (engine/attention.py) computes what transformers' SDPA computes,
on every transformers the lock may hold, and the real loading path switches to it."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from serve_app.config import ModelConfig
from serve_app.engine.attention import NAME, packed_gqa_sdpa
from serve_app.engine.factory import create_engine
from serve_app.engine.loading import load_hf_config, load_model, resolve_source
from serve_app.engine.placement import plan_placement
from serve_app.generation import GenerationRequest, SamplingParams


class Heads(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def padding_mask(batch: int, length: int, as_bool: bool) -> torch.Tensor:
    keep = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    keep[0, ..., :3] = False  # the first row is left-padded
    return keep if as_bool else torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("groups", [2, 3])
@pytest.mark.parametrize("as_bool", [True, False])
def test_one_query_token_per_row_matches_transformers_sdpa(groups, as_bool):
    torch.manual_seed(0)
    batch, kv_heads, dim, length = 3, 2, 16, 11
    query = torch.randn(batch, kv_heads * groups, 1, dim)
    key, value = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    mask = padding_mask(batch, length, as_bool)
    ours, _ = packed_gqa_sdpa(Heads(groups), query, key, value, mask, scaling=dim ** -0.5)
    theirs, _ = sdpa_attention_forward(Heads(groups), query, key, value, mask, scaling=dim ** -0.5)
    assert ours.shape == theirs.shape == (batch, 1, kv_heads * groups, dim)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("tokens", [2, 4])
@pytest.mark.parametrize("as_bool", [True, False])
def test_a_few_tokens_per_row_with_a_causal_mask_match_transformers_sdpa(tokens, as_bool):
    """Jump-forward feeds several tokens per row: each sees the cache and the tokens before it."""
    torch.manual_seed(2)
    batch, kv_heads, groups, dim, length = 3, 2, 3, 16, 11
    query = torch.randn(batch, kv_heads * groups, tokens, dim)
    key, value = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    keep = torch.ones(batch, 1, tokens, length, dtype=torch.bool)
    keep[0, ..., :3] = False  # a left-padded row
    keep[..., length - tokens:] = torch.ones(tokens, tokens, dtype=torch.bool).tril()  # causal among the new
    mask = keep if as_bool else torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    ours, _ = packed_gqa_sdpa(Heads(groups), query, key, value, mask, scaling=dim ** -0.5)
    theirs, _ = sdpa_attention_forward(Heads(groups), query, key, value, mask, scaling=dim ** -0.5)
    assert ours.shape == theirs.shape == (batch, tokens, kv_heads * groups, dim)
    torch.testing.assert_close(ours, theirs)


def test_a_prefill_or_a_per_head_mask_goes_to_transformers_sdpa_unchanged():
    torch.manual_seed(1)
    query, key, value = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    per_head = torch.ones(2, 4, 1, 5, dtype=torch.bool)
    for q, mask in ((query, None), (query[:, :, :1], per_head)):
        ours, _ = packed_gqa_sdpa(Heads(2), q, key, value, mask)
        theirs, _ = sdpa_attention_forward(Heads(2), q, key, value, mask)
        torch.testing.assert_close(ours, theirs)


def test_the_loaded_model_decodes_with_the_packed_attention_and_the_same_tokens(tiny_model_dir):
    config = ModelConfig(name="tiny", source=tiny_model_dir, sampling={"temperature": 0})
    source = resolve_source(config)
    hf_config = load_hf_config(source)
    loaded = load_model(config, plan_placement(config, [], hf_config, cpu_memory=2**33), source, hf_config)
    assert loaded.model.config._attn_implementation == NAME
    prompts = ["hello", "a much longer prompt about json"]  # left-padded rows in one batch
    requests = [GenerationRequest(prompt=p, sampling=SamplingParams(max_new_tokens=12)) for p in prompts]
    with create_engine(config) as engine:
        packed = [r.token_ids for r in engine.generate(requests)]
    stock = ModelConfig(name="tiny", source=tiny_model_dir, sampling={"temperature": 0},
                        loading={"attn_implementation": "eager"})
    with create_engine(stock) as engine:
        assert engine.model.config._attn_implementation == "eager"
        assert [r.token_ids for r in engine.generate(requests)] == packed
