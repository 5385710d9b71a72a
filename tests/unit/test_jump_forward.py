"""Jump-forward (engine/jump_forward.py): forced tokens appended without sampling and fed several
per forward pass give exactly the tokens that feeding them one per forward pass gives, in a batch
mixed with unconstrained rows; the block of one step is built and sized as documented."""

import json

import pytest
import torch

from serve_app.config import ModelConfig
from serve_app.constraints import parse_constraint
from serve_app.engine import jump_forward
from serve_app.engine.factory import create_engine
from serve_app.engine.jump_forward import block, feed_width, step_width, uncached
from serve_app.engine.stream import Row, Stream
from serve_app.generation import GenerationRequest, SamplingParams

SHIPMENT = {"type": "object", "additionalProperties": False,
            "required": ["shipment_identifier", "destination_country_code", "priority_level"],
            "properties": {"shipment_identifier": {"type": "integer"},
                           "destination_country_code": {"enum": ["NLD-Amsterdam", "NLD-Rotterdam", "DEU-Hamburg"]},
                           "priority_level": {"const": "standard-overnight"}}}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"}}}
CONSTRAINTS = [{"type": "json_schema", "schema": SHIPMENT}, {"type": "json_schema", "schema": PERSON},
               {"type": "regex", "pattern": r"ID-[0-9]{2}-(alpha|beta)-end"},
               {"type": "choice", "choices": ["affirmative answer", "negative answer"]}]


def requests(temperature: float = 0.0) -> list[GenerationRequest]:
    constrained = [GenerationRequest(prompt=f"Fill in row {i}.", constraint=parse_constraint(c),
                                     sampling=SamplingParams(max_new_tokens=160, temperature=temperature, seed=i))
                   for i, c in enumerate(CONSTRAINTS)]
    free = [GenerationRequest(prompt=f"Say something, {i}", sampling=SamplingParams(max_new_tokens=40,
                                                                                    temperature=temperature, seed=9))
            for i in range(2)]
    return constrained[:2] + free[:1] + constrained[2:] + free[1:]


def run(tiny_model_dir: str, jump: int, batch: list[GenerationRequest]) -> tuple[list, int, int]:
    config = ModelConfig(name="tiny", source=tiny_model_dir, jump_forward=jump, sampling={"temperature": 0})
    with create_engine(config) as engine:
        results = engine.generate(batch)
        return results, engine.loop.forced_tokens, engine.loop.steps


def test_forced_tokens_fed_in_blocks_give_the_tokens_fed_one_per_pass(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(jump_forward, "FIXED_COST_SLOTS", 10_000)  # every forced token goes in the same pass
    one_per_pass, forced_one, steps_one = run(tiny_model_dir, 1, requests())
    blocks, forced_blocks, steps_blocks = run(tiny_model_dir, 8, requests())
    assert [r.token_ids for r in blocks] == [r.token_ids for r in one_per_pass]
    assert [r.finish_reason for r in blocks] == [r.finish_reason for r in one_per_pass]
    assert forced_blocks == forced_one > 10
    assert steps_blocks < steps_one  # the forced tokens went through fewer forward passes
    shipment = json.loads(blocks[0].text)
    assert shipment["priority_level"] == "standard-overnight"
    for result in blocks[:2] + blocks[3:5]:
        assert result.valid is True, result.text
    assert blocks[2].valid is None and blocks[5].valid is None


def test_without_jump_forward_every_token_is_sampled_and_the_output_is_as_valid(tiny_model_dir):
    results, forced, _ = run(tiny_model_dir, 0, requests())
    assert forced == 0
    assert all(r.valid is True for r in results[:2] + results[3:5])


def test_seeded_sampled_rows_reproduce_with_jump_forward(tiny_model_dir):
    first, forced, _ = run(tiny_model_dir, 8, requests(temperature=0.9))
    again, _, _ = run(tiny_model_dir, 8, requests(temperature=0.9))
    assert forced > 0
    assert [r.token_ids for r in first] == [r.token_ids for r in again]


def test_the_width_is_one_unless_enough_rows_have_tokens_to_feed():
    assert feed_width([1] * 16, 8) == 1
    assert feed_width([4] + [1] * 15, 8) == 1  # 15 padding slots for 3 tokens: not worth a wider pass
    assert feed_width([4] * 16, 8) == 4
    assert feed_width([6], 8) == 6  # one row: the pass costs about the same however wide
    assert feed_width([6], 1) == 1 and feed_width([6], 0) == 1


def test_with_a_compiled_step_only_a_few_rows_with_tokens_to_feed_take_an_eager_wider_pass():
    assert step_width([6], 8, compiled=True) == 6  # one eager pass rather than six compiled steps
    assert step_width([4, 3], 8, compiled=True) == 4
    assert step_width([4, 1, 1, 1], 8, compiled=True) == 1  # a compiled step feeds four rows for less
    assert step_width([2] + [1] * 15, 8, compiled=True) == 1
    assert step_width([4] + [1] * 15, 8, compiled=False) == 1 and step_width([6], 8, compiled=False) == 6


def test_a_block_right_aligns_each_rows_tokens_with_their_own_positions():
    ids, mask, positions, fed = block([[5, 6, 7], [9]], 2, [10, 4], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 9]]
    assert mask.tolist() == [[1, 1], [0, 1]]
    assert positions[0].tolist() == [10, 11] and positions[1, 1] == 4
    assert fed == [2, 1]


def test_the_uncached_tail_reaches_into_the_prompt_after_a_rollback():
    stream = Stream(Row(prompt_ids=[1, 2, 3], max_new_tokens=8, temperature=0, top_p=1, seed=None, stop=[]))
    stream.output.token_ids = [7, 8, 9]
    assert uncached(stream, 5) == [9]
    assert uncached(stream, 3) == [7, 8, 9]
    assert uncached(stream, 2) == [3, 7, 8, 9]
    assert torch.equal(torch.tensor(uncached(stream, 6)), torch.tensor([], dtype=torch.long))


@pytest.mark.parametrize("jump", [0, 8])
def test_the_status_counts_forced_tokens(tiny_model_dir, jump):
    config = ModelConfig(name="tiny", source=tiny_model_dir, jump_forward=jump, sampling={"temperature": 0})
    with create_engine(config) as engine:
        engine.generate(requests()[:1])
        assert (engine.status().forced_tokens > 0) == (jump > 0)


def test_a_block_gives_the_logits_of_feeding_its_tokens_one_per_pass(tiny_model_dir):
    """The arithmetic under the token test, closer: two left-padded rows, one fed three tokens
    in one block, against feeding them one per pass."""
    from serve_app.engine.batch import cache_keyword, preallocate

    config = ModelConfig(name="tiny", source=tiny_model_dir, sampling={"temperature": 0})
    with create_engine(config) as engine, torch.inference_mode():
        model, kw = engine.model, cache_keyword(engine.model)
        prompts, tails = [[5, 6, 7, 8, 9], [11, 12]], [[20, 21, 22], [30]]

        def prefill():
            ids = torch.tensor([prompts[0], [0] * 3 + prompts[1]])
            mask = torch.tensor([[1] * 5, [0] * 3 + [1] * 2])
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                        use_cache=True)
            preallocate(out[kw])
            return out[kw], mask, [5, 2]

        cache, mask, positions = prefill()
        ids, columns, where, fed = block(tails, 3, positions, pad_id=0)
        mask = torch.cat([mask, columns], 1)
        wide = model(input_ids=ids, attention_mask=mask, position_ids=where, use_cache=True,
                     **{kw: cache}).logits[:, -1]
        cache, mask, positions = prefill()
        for j in range(3):
            rows = [[tails[0][j]], [tails[1][0]] if j == 2 else [0]]
            step = [[1], [1 if j == 2 else 0]]
            mask = torch.cat([mask, torch.tensor(step)], 1)
            where = torch.tensor([[positions[0] + j], [positions[1]]])
            narrow = model(input_ids=torch.tensor(rows), attention_mask=mask, position_ids=where, use_cache=True,
                           **{kw: cache}).logits[:, -1]
        torch.testing.assert_close(wide, narrow, rtol=1e-4, atol=1e-4)


def test_the_closers_completion_is_appended_at_once_and_the_row_ends_without_feeding_it(tiny_model_dir,
                                                                                        monkeypatch):
    """Once closing begins, the rest of its completion is fixed: appended in one go, the row ends at
    once, with the tokens that writing it one per step gives (seeded sampling before it alike)."""
    from serve_app.engine import decode

    schema = {"type": "object", "additionalProperties": False, "required": ["note", "count"],
              "properties": {"note": {"type": "string"}, "count": {"type": "integer"}}}
    with create_engine(ModelConfig(name="tiny", source=tiny_model_dir)) as engine:
        budget = engine.compile(parse_constraint({"type": "json_schema", "schema": schema})).min_tokens + 10
    batch = [GenerationRequest(prompt="Answer in JSON.", constraint=parse_constraint(
        {"type": "json_schema", "schema": schema}), sampling=SamplingParams(max_new_tokens=budget, temperature=1,
                                                                          seed=seed)) for seed in range(4)]
    at_once, forced, steps = run(tiny_model_dir, 8, batch)

    def without_the_closers(stream, limit):
        closer = stream.row.closer
        return [] if closer is not None and closer.closed_early else jump_forward.forced_tokens(stream, limit)

    monkeypatch.setattr(decode, "forced_tokens", without_the_closers)
    one_per_step, forced_apart, steps_apart = run(tiny_model_dir, 8, batch)
    assert [r.token_ids for r in at_once] == [r.token_ids for r in one_per_step]
    assert sum(r.closed_early for r in at_once) >= 2 and all(r.valid for r in at_once)
    assert forced > forced_apart and steps < steps_apart
