"""Placement plans, proved without any GPU: accelerate plans a meta-initialised model against
the per-GPU memory we give it."""

import pytest
from transformers import LlamaConfig

from serve_app.config import ModelConfig
from serve_app.engine.loading import load_model, resolve_source
from serve_app.engine.placement import GIB, GpuInfo, infer_device_map, plan_placement
from serve_app.errors import ModelLoadError

LLAMA_7B = LlamaConfig(  # the shape of Llama-2-7B
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
)


def gpu(index, gib_total, capability=(8, 0), gpu_id=None):
    return GpuInfo(id=gpu_id or str(index), index=index, total_bytes=int(gib_total * GIB),
                   compute_capability=capability)


def model(share, dtype="auto", **limits):
    return ModelConfig(name="m", source="x", dtype=dtype, placement={"gpus_per_replica": share},
                       limits={"max_prompt_tokens": 1024, "max_new_tokens": 512, **limits})


def test_cpu_plan_without_native_bf16_is_float32_with_no_device_map():
    plan = plan_placement(model(0), [], LLAMA_7B, cpu_features=frozenset({"avx2", "avx512f", "fma"}))
    assert plan.device == "cpu"
    assert plan.dtype == "float32"
    assert plan.device_map is None and plan.max_memory is None
    assert plan.gpu_ids == []


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16", "bf16"])
def test_cpu_plan_is_bfloat16_where_the_cpu_computes_it_natively(flag):
    plan = plan_placement(model(0), [], LLAMA_7B, cpu_features=frozenset({"avx2", flag}))
    assert plan.dtype == "bfloat16"
    assert "bfloat16" in plan.reason
    assert plan_placement(model(0, dtype="float32"), [], LLAMA_7B, cpu_features=frozenset({flag})).dtype == "float32"


def test_this_machines_cpu_flags_decide_the_auto_dtype():
    from serve_app.engine.placement import CPU_BF16_FLAGS, cpu_flags

    expected = "bfloat16" if cpu_flags() & CPU_BF16_FLAGS else "float32"
    assert plan_placement(model(0), [], LLAMA_7B).dtype == expected


def test_cpu_batch_cap_comes_from_memory_and_respects_max_batch_size():
    roomy = plan_placement(model(0, max_batch_size=64), [], LLAMA_7B, cpu_memory=512 * GIB, cpu_features=frozenset())
    tight = plan_placement(model(0, max_batch_size=64), [], LLAMA_7B, cpu_memory=64 * GIB, cpu_features=frozenset())
    starved = plan_placement(model(0, max_batch_size=64), [], LLAMA_7B, cpu_memory=8 * GIB, cpu_features=frozenset())
    assert roomy.max_batch_size == 64
    assert 1 < tight.max_batch_size < 64
    assert starved.max_batch_size == 1  # loaded anyway on CPU: one row at a time
    assert "batch cap" in tight.reason
    unplanned = plan_placement(model(0, max_batch_size=64), [], LLAMA_7B, cpu_features=frozenset())
    assert unplanned.max_batch_size == 64 and unplanned.budget_bytes == 0


def test_the_prefix_cache_is_counted_in_the_memory_a_batch_is_planned_against():
    def cap(prefix_gib: float, gpus: list) -> int:
        config = model(1 if gpus else 0, max_batch_size=64).model_copy(
            update={"prefix_cache_bytes": int(prefix_gib * GIB)})
        return plan_placement(config, gpus, LLAMA_7B, cpu_memory=128 * GIB, cpu_features=frozenset()).max_batch_size

    for gpus in ([], [gpu(0, 24)]):
        assert 1 < cap(4, gpus) < cap(0, gpus) < 64


def test_no_visible_gpu_plans_cpu_even_when_gpus_were_asked_for():
    plan = plan_placement(model(1), [], LLAMA_7B)
    assert plan.device == "cpu"
    assert "no GPU visible" in plan.reason


def test_quarter_of_a_24gb_card_gives_about_6gb():
    plan = plan_placement(model(0.25), [gpu(0, 24)])
    assert plan.device == "cuda"
    assert 5.5 * GIB <= plan.budget_bytes <= 6 * GIB
    assert plan.memory_fraction == 0.25
    assert plan.device_map == {"": 0}


def test_half_of_a_16gb_card_gives_about_8gb_minus_headroom():
    plan = plan_placement(model(0.5), [gpu(0, 16)])
    assert 7 * GIB < plan.budget_bytes < 8 * GIB


@pytest.mark.parametrize(("capability", "dtype"), [((8, 0), "bfloat16"), ((9, 0), "bfloat16"), ((7, 5), "float16")])
def test_auto_dtype_suits_the_card(capability, dtype):
    assert plan_placement(model(1), [gpu(0, 16, capability)]).dtype == dtype


def test_explicit_dtype_wins_over_auto():
    assert plan_placement(model(1, dtype="float32"), [gpu(0, 80)]).dtype == "float32"
    assert plan_placement(model(0, dtype="bfloat16"), []).dtype == "bfloat16"


def test_7b_fp16_over_two_16gb_t4s_splits_across_both():
    gpus = [gpu(0, 16, (7, 5), "1"), gpu(1, 16, (7, 5), "2")]
    plan = plan_placement(model(2), gpus, LLAMA_7B)
    assert plan.dtype == "float16"
    assert plan.device_map == "auto"
    assert plan.gpu_ids == ["1", "2"]
    assert set(plan.max_memory) == {0, 1}
    assert plan.fits
    device_map = infer_device_map(LLAMA_7B, plan)
    assert set(device_map.values()) == {0, 1}


def test_7b_on_one_80gb_card_stays_on_it():
    plan = plan_placement(model(1), [gpu(0, 80)], LLAMA_7B)
    assert plan.device_map == {"": 0}
    assert set(infer_device_map(LLAMA_7B, plan).values()) == {0}
    multi = plan.model_copy(update={"device_map": "auto"})
    assert set(infer_device_map(LLAMA_7B, multi).values()) == {0}


def test_plan_uses_exactly_the_gpus_asked_for():
    gpus = [gpu(i, 16) for i in range(4)]
    assert len(plan_placement(model(2), gpus, LLAMA_7B).gpu_ids) == 2


def test_batch_cap_shrinks_with_memory_and_respects_max_batch_size():
    big = plan_placement(model(1, max_batch_size=64), [gpu(0, 80)], LLAMA_7B)
    small = plan_placement(model(1, max_batch_size=64), [gpu(0, 16)], LLAMA_7B)
    assert big.max_batch_size == 64
    assert 1 <= small.max_batch_size < big.max_batch_size
    assert plan_placement(model(1, max_batch_size=4), [gpu(0, 80)], LLAMA_7B).max_batch_size == 4


def test_a_model_larger_than_its_share_does_not_fit():
    plan = plan_placement(model(0.25), [gpu(0, 16)], LLAMA_7B)
    assert not plan.fits
    assert "does not fit" in plan.reason


def test_logical_gpus_without_cuda_fall_back_to_cpu_and_say_so(tiny_model_dir):
    config = ModelConfig(name="m", source=tiny_model_dir, placement={"gpus_per_replica": 2})
    plan = plan_placement(config, [gpu(0, 16, gpu_id="1"), gpu(1, 16, gpu_id="2")])
    loaded = load_model(config, plan, resolve_source(config))
    assert loaded.fell_back
    assert "CUDA is not available" in loaded.fallback_reason
    assert loaded.plan.device == "cpu"
    assert str(loaded.model.device) == "cpu"


def test_without_cpu_fallback_an_unusable_gpu_plan_is_an_error(tiny_model_dir):
    config = ModelConfig(name="m", source=tiny_model_dir,
                         placement={"gpus_per_replica": 1, "cpu_fallback": False})
    plan = plan_placement(config, [gpu(0, 16)])
    with pytest.raises(ModelLoadError, match="cannot load m on GPU"):
        load_model(config, plan, resolve_source(config))


def test_torch_threads_follow_the_placement_setting():
    import os

    import torch

    from serve_app.engine.loading import apply_torch_threads

    before = torch.get_num_threads()
    try:
        assert apply_torch_threads(1) == 1
        assert apply_torch_threads("all") == len(os.sched_getaffinity(0))
        assert apply_torch_threads("auto") == len(os.sched_getaffinity(0))  # "auto" leaves it as it is
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="torch_threads"):
        ModelConfig(name="m", source="x", placement={"torch_threads": 0})
    with pytest.raises(ValueError, match="torch_threads"):
        ModelConfig(name="m", source="x", placement={"torch_threads": "many"})
