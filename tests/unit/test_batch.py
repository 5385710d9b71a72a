"""The KV cache layer that appends in place matches transformers' concatenating one exactly."""

import torch
from transformers.cache_utils import DynamicLayer

from serve_app.engine.batch import GrowableLayer, joinable_cache


def test_a_growable_layer_holds_what_a_dynamic_layer_holds_through_growth_and_reassignment():
    torch.manual_seed(0)
    plain, grown = DynamicLayer(), None
    prompt_k, prompt_v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    plain.update(prompt_k, prompt_v)
    grown = GrowableLayer.from_layer(plain)
    for step in range(150):  # past the first spare room (64 columns), twice
        k, v = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
        expected = plain.update(k, v)
        got = grown.update(k, v)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), step
        assert grown.get_seq_length() == plain.get_seq_length()
    # What Batch.keep does: keys first, then values, each from its own old view.
    keep = torch.tensor([0, 2])
    for layer in (plain, grown):
        layer.keys = layer.keys.index_select(0, keep)[:, :, 7:]
        layer.values = layer.values.index_select(0, keep)[:, :, 7:]
    assert torch.equal(grown.keys, plain.keys) and torch.equal(grown.values, plain.values)
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    expected, got = plain.update(k, v), grown.update(k, v)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_a_cache_of_growable_layers_still_takes_new_rows():
    class Cache:
        layers = [GrowableLayer()]

    assert joinable_cache(Cache())


def test_rows_of_very_different_lengths_are_prefilled_apart_and_similar_ones_together():
    from types import SimpleNamespace

    from serve_app.engine.decode import MAX_PADDING_SHARE, prefill_groups

    def stream(length, generated=0):
        return SimpleNamespace(row=SimpleNamespace(prompt_ids=[1] * length),
                               output=SimpleNamespace(token_ids=[2] * generated))

    rows = [stream(600), stream(40), stream(44), stream(590, generated=5), stream(42), stream(150)]
    groups = prefill_groups(rows)
    lengths = [[len(s.row.prompt_ids) + len(s.output.token_ids) for s in g] for g in groups]
    assert lengths == [[40, 42, 44], [150], [595, 600]]
    for group in lengths:
        assert max(group) * len(group) <= (1 + MAX_PADDING_SHARE) * sum(group)
    assert sorted(map(id, rows)) == sorted(id(s) for g in groups for s in g)  # every row, once
    assert prefill_groups([]) == []
