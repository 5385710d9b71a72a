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


def test_keeping_rows_in_place_holds_what_index_select_holds_through_later_growth():
    torch.manual_seed(1)
    plain = DynamicLayer()
    plain.update(torch.randn(5, 2, 6, 4), torch.randn(5, 2, 6, 4))
    grown = GrowableLayer.from_layer(plain)
    for keep, start in (([0, 1, 2, 3, 4], 0), ([0, 2, 3, 4], 2), ([1, 3], 3), ([0, 1], 0), ([1], 1)):
        plain.keys = plain.keys.index_select(0, torch.tensor(keep))[:, :, start:]
        plain.values = plain.values.index_select(0, torch.tensor(keep))[:, :, start:]
        grown.keep_rows(keep, start)
        assert torch.equal(grown.keys, plain.keys) and torch.equal(grown.values, plain.values)
        for _ in range(40):  # past the spare room: growth copies from the kept columns on
            k, v = torch.randn(len(keep), 2, 1, 4), torch.randn(len(keep), 2, 1, 4)
            expected, got = plain.update(k, v), grown.update(k, v)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
            assert grown.get_seq_length() == plain.get_seq_length()


def test_a_cache_of_growable_layers_still_takes_new_rows():
    class Cache:
        layers = [GrowableLayer()]

    assert joinable_cache(Cache())


def test_rows_of_very_different_lengths_are_prefilled_apart_and_similar_ones_together():
    from types import SimpleNamespace

    from serve_app.engine.batch import MAX_PADDING_SHARE, prefill_groups

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


def test_common_prefix_and_the_prefix_cache_bounds():
    from serve_app.engine.prefix_cache import MIN_PREFIX_TOKENS, PrefixCache, common_prefix

    assert common_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([5] * 40, [5] * 40) == 40
    layer = (torch.zeros(1, 2, 40, 4), torch.zeros(1, 2, 40, 4))
    size = 2 * layer[0].numel() * layer[0].element_size()
    cache = PrefixCache(max_bytes=2 * size)
    first, second, third = list(range(40)), list(range(100, 140)), list(range(200, 240))
    cache.add(first, [layer])
    cache.add(list(range(MIN_PREFIX_TOKENS - 1)), [layer])  # too short to be worth it
    assert len(cache.entries) == 1
    # Each context keeps at least one token to prefill.
    assert cache.find(first[:25] + [8, 9]) == (tuple(first), 25)
    assert cache.find(first) == (tuple(first), 39)
    assert cache.find(first[:10] + [1] * 30) is None  # under MIN_PREFIX_TOKENS shared
    cache.add(second, [(torch.ones(1, 2, 40, 4), torch.ones(1, 2, 40, 4))])
    hits = cache.find_each([first[:25] + [8], [5] * 30, second[:30] + [1]])  # each row its own entry
    assert hits == [(tuple(first), 25), None, (tuple(second), 30)]
    [(keys, values)] = cache.rows(hits)  # left-padded to the longest; a row without a hit is padding
    assert keys.shape == (3, 2, 30, 4) and values.shape == (3, 2, 30, 4)
    assert keys[2].eq(1).all() and keys[1].eq(0).all() and keys[0, :, :5].eq(0).all()
    # Over the byte bound: the least recently used prompt goes, of those not reused whole before (the
    # first one was, 39 of its 40 tokens; the second only in part).
    cache.add(third, [layer])
    assert list(cache.entries) == [tuple(first), tuple(third)] and cache.stats()["bytes"] == 2 * size
    assert cache.stats()["hits"] == 4 and cache.stats()["tokens_reused"] == 2 * 25 + 39 + 30


def test_a_prompt_that_adds_a_few_tokens_is_worth_keeping_the_second_time_it_comes(monkeypatch):
    from serve_app.engine import prefix_cache
    from serve_app.engine.prefix_cache import PrefixCache

    monkeypatch.setattr(prefix_cache, "SEEN_ONCE_KEPT", 2)
    cache = PrefixCache(1 << 20)
    base = list(range(40))
    assert cache.worth_keeping(base + [1, 2], 0)  # 42 new tokens
    assert not cache.worth_keeping(base + [1], 40)
    assert cache.worth_keeping(base + [1], 40)  # the second time
    assert not cache.worth_keeping(base + [1], 40)  # counted afresh
    for other in ([2], [3], [4]):
        assert not cache.worth_keeping(base + other, 40)
    assert not cache.worth_keeping(base + [2], 40)  # forgotten: only the latest 2 are remembered
    assert cache.worth_keeping(base + [4], 40)


def test_prompts_that_share_a_prefix_generate_what_they_generate_without_the_prefix_cache(tiny_config):
    from serve_app.constraints import parse_constraint
    from serve_app.engine.factory import create_engine
    from serve_app.generation import GenerationRequest, SamplingParams

    system = "You are a careful assistant who answers in the requested format and nothing else. " * 3

    def request(i, constraint=None):
        return GenerationRequest(messages=[{"role": "system", "content": system},
                                           {"role": "user", "content": f"Question {i}: describe item {i * 7}."}],
                                 constraint=parse_constraint(constraint) if constraint else None,
                                 sampling=SamplingParams(max_new_tokens=24, temperature=0))

    schema = {"type": "json_schema", "schema": {"type": "object", "properties": {"n": {"type": "integer"}},
                                                "required": ["n"]}}
    requests = [request(0), request(1, schema), request(2), request(3, schema), request(4)]
    outputs = {}
    for size in (0, 64 * 1024 * 1024):
        config = tiny_config.model_copy(update={"prefix_cache_bytes": size, "dtype": "float32"})
        with create_engine(config) as engine:
            first = engine.generate(requests[:1])  # fills the prefix cache
            rest = engine.generate(requests[1:])  # prefilled from the shared prefix, together
            outputs[size] = [r.text for r in first + rest]
            stats = engine.status().model_dump()["prefix_cache"]
        if size:
            assert stats["hits"] >= 1 and stats["tokens_reused"] >= 4 * 32, stats
        else:
            assert stats is None
    assert outputs[0] == outputs[64 * 1024 * 1024]


def test_rows_prefilled_together_each_reuse_their_own_earlier_prompt(tiny_config):
    from serve_app.engine.factory import create_engine
    from serve_app.generation import GenerationRequest, SamplingParams

    prompts = ["A first long prompt that talks about rivers, bridges, boats and the towns along them. " * 2,
               "Quite another prompt: mountains, valleys and the weather on the high passes in winter. " * 2]
    requests = [GenerationRequest(prompt=p + tail, sampling=SamplingParams(max_new_tokens=12, temperature=0))
                for p in prompts for tail in ("Go on.", "Now go on, please.")]
    running = GenerationRequest(prompt="Meanwhile.", sampling=SamplingParams(max_new_tokens=8, temperature=0))
    outputs = {}
    for size in (0, 64 * 1024 * 1024):
        config = tiny_config.model_copy(update={"prefix_cache_bytes": size, "dtype": "float32"})
        with create_engine(config) as engine:
            first = [engine.generate([requests[0]])[0], engine.generate([requests[2]])[0]]  # one entry each
            prefills = engine.loop.prefills
            # Admitted together while another row runs: one prefill, two different entries.
            together = joining_a_running_row(engine, running, [requests[1], requests[3]])[1:]
            assert engine.loop.prefills == prefills + 2  # the running row's, then theirs
            outputs[size] = [r.text for r in first + together]
            stats = engine.status().model_dump()["prefix_cache"]
        if size:
            shared = [len(engine.tokenizer(p)["input_ids"]) - 2 for p in prompts]
            assert stats["hits"] == 2 and stats["tokens_reused"] >= sum(shared), stats
    assert outputs[0] == outputs[64 * 1024 * 1024]


def test_where_a_cache_cannot_be_built_from_tensors_the_prefix_cache_turns_off_and_rows_still_generate(
        tiny_config, monkeypatch):
    import transformers

    from serve_app.engine.factory import create_engine
    from serve_app.generation import GenerationRequest, SamplingParams

    def old_api(*args, **kwargs):
        raise TypeError("DynamicCache() takes no tensors here")

    system = "You are a careful assistant who answers in the requested format and nothing else. " * 3
    requests = [GenerationRequest(messages=[{"role": "system", "content": system},
                                            {"role": "user", "content": f"Question {i}."}],
                                  sampling=SamplingParams(max_new_tokens=8, temperature=0)) for i in range(2)]
    with create_engine(tiny_config) as engine:
        engine.generate(requests[:1])
        monkeypatch.setattr(transformers, "DynamicCache", old_api)
        [result] = engine.generate(requests[1:])
        assert result.usage.completion_tokens == 8
        assert engine.loop.prefixes is None and engine.status().model_dump()["prefix_cache"] is None


def test_prompts_reused_before_outlive_a_run_of_one_off_prompts_within_their_share():
    from serve_app.engine import prefix_cache
    from serve_app.engine.prefix_cache import PrefixCache

    def layers(tokens: int) -> list:
        return [(torch.zeros(1, 1, tokens, 4), torch.zeros(1, 1, tokens, 4))]

    size = prefix_cache.layers_bytes(layers(40))
    cache = PrefixCache(max_bytes=4 * size)
    shared = list(range(40))
    cache.add(shared, layers(40))
    assert cache.find(shared[:30] + [7]) == (tuple(shared), 30) and not cache.hot  # its start only: not hot
    assert cache.find(shared + [7]) == (tuple(shared), 40) and cache.hot == {tuple(shared)}  # again: hot
    for n in range(10):  # one-off prompts, each evicting the least recent one-off, never the hot one
        cache.add(list(range(1000 * (n + 1), 1000 * (n + 1) + 40)), layers(40))
    assert tuple(shared) in cache.entries and len(cache.entries) == 4
    assert cache.find(shared + [8]) == (tuple(shared), 40)
    # Hot prompts over their share of the bytes: the least recent hot one goes, so new ones get in.
    others = [list(range(1000 * n, 1000 * n + 40)) for n in (8, 9, 10)]
    for prompt in others:
        assert cache.find(prompt + [1]) is not None
    assert cache.hot == set(map(tuple, others)) | {tuple(shared)}
    cache.add(list(range(50000, 50040)), layers(40))
    assert tuple(shared) not in cache.entries and tuple(shared) not in cache.hot
    assert cache.stats()["bytes"] == 4 * size


def test_prompts_the_prefix_cache_holds_all_but_a_few_tokens_of_join_without_a_prefill_and_generate_the_same(
        tiny_config):
    import json

    from serve_app.constraints import parse_constraint
    from serve_app.engine.decode import FOLD_TAIL
    from serve_app.engine.factory import create_engine
    from serve_app.generation import GenerationRequest, SamplingParams

    prompt = "A long prompt about rivers, bridges, boats and the towns along them, told slowly. " * 2
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"]}
    running = GenerationRequest(prompt="Keep going for a while.", sampling=SamplingParams(max_new_tokens=40))
    requests = [GenerationRequest(prompt=prompt, sampling=SamplingParams(max_new_tokens=12, temperature=0)),
                GenerationRequest(prompt=prompt + "So", sampling=SamplingParams(max_new_tokens=32, temperature=0),
                                  constraint=parse_constraint({"type": "json_schema", "schema": schema})),
                GenerationRequest(prompt="Else.",
                                  sampling=SamplingParams(max_new_tokens=12, temperature=0.8, seed=3))]
    outputs = {}
    for size in (0, 64 * 1024 * 1024):
        config = tiny_config.model_copy(update={"prefix_cache_bytes": size, "dtype": "float32"})
        with create_engine(config) as engine:
            # The prefix cache holds the first prompt (the other is too short to be kept).
            alone = engine.generate([requests[0], requests[2]])
            tail = len(engine.prompt_ids(requests[1])) - len(engine.prompt_ids(requests[0])) + 1
            assert 1 < tail <= FOLD_TAIL
            engine.loop._start_counting()
            outputs[size] = [r.text for r in alone + joining_a_running_row(engine, running, requests)]
            engine.loop.fault_injector = None
            status = engine.status()
        # With the cache, the first two join the running batch from it, each fed the end of its
        # prompt by the decode steps; the third is prefilled.
        if size:
            assert (status.prefills, status.admitted_without_prefill) == (2, 2)
        else:  # the running row, then the two long prompts together, and the short one
            assert status.prefills == 3 and status.admitted_without_prefill == 0
    assert outputs[0] == outputs[64 * 1024 * 1024]
    assert outputs[0][:2] == [outputs[0][3], outputs[0][5]] and json.loads(outputs[0][4]).keys() == {"n", "ok"}


def test_a_prompt_a_few_tokens_longer_than_a_cached_one_is_kept_once_it_repeats_then_joins_without_a_prefill(
        tiny_config):
    from serve_app.engine.factory import create_engine
    from serve_app.generation import GenerationRequest, SamplingParams

    prompt = "A long prompt about rivers, bridges, boats and the towns along them, told slowly. " * 2
    first, longer = (GenerationRequest(prompt=p, sampling=SamplingParams(max_new_tokens=10, temperature=0))
                     for p in (prompt, prompt + "Go on."))
    config = tiny_config.model_copy(update={"prefix_cache_bytes": 64 * 1024 * 1024, "dtype": "float32"})
    with create_engine(config) as engine:
        engine.generate([first])
        prefixes = engine.loop.prefixes
        assert prefixes is not None
        once = engine.generate([longer])[0]  # prefilled from the first prompt's cache; once is not enough
        assert list(prefixes.entries) == [tuple(engine.prompt_ids(first))]
        twice = engine.generate([longer])[0]  # prefilled again, and kept
        assert len(prefixes.entries) == 2 and engine.loop.folded == 0
        prefills = engine.loop.prefills
        again = engine.generate([longer])[0]
        assert (engine.loop.prefills, engine.loop.folded) == (prefills, 1)
    assert again.text == twice.text == once.text and again.usage.completion_tokens == 10


def joining_a_running_row(engine, running, requests) -> list:
    """Generate `running`, and `requests` admitted together while it runs: the loop holds in the
    running row's prefill until they are queued."""
    import threading

    reached, go = threading.Event(), threading.Event()

    def hold(rows: int) -> None:
        if not reached.is_set():  # the running row's prefill
            reached.set()
            assert go.wait(60)

    engine.loop.fault_injector = hold
    first = engine.submit_prepared(engine.prepare(running), deltas=False)
    assert reached.wait(60)
    rest = [engine.submit_prepared(engine.prepare(r), deltas=False) for r in requests]
    go.set()
    return [engine.result(s, s.stream.result()) for s in [first, *rest]]
